# The default image where a registry is reachable. On a machine without one, images/build-base.sh builds
# the same contents from the Debian mirror with debootstrap.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git ca-certificates procps less \
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD ["/bin/bash"]
