use std::os::unix::fs::PermissionsExt;

use super::*;

/// 64 KiB segments, 8 of head and 8 of tail.
const SMALL_CAP: u64 = MIB;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Letters and digits, so that every position is told apart from its neighbours and no byte
/// of data can be mistaken for the start of a marker ('\n', '[').
fn data(len: u64, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = Rng(seed | 1);
    (0..len)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
        .collect()
}

fn read_all(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let n = LogReader::new(dir).read_available(&mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

fn segments_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| segment_index(e.file_name().as_encoded_bytes()).is_some())
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn marker(bytes: u64, max_bytes: u64) -> Vec<u8> {
    gap_marker(Some(bytes), Some(LogLayout::new(max_bytes))).into_bytes()
}

/// Checks that `output` is `input` in order, with runs of it replaced by markers whose counts
/// are exactly the lengths of those runs; returns the counts.
fn gaps_in(output: &[u8], input: &[u8]) -> Vec<u64> {
    const START: &[u8] = b"\n[agentbox: ";
    let mut cursor = 0;
    let mut rest = output;
    let mut gaps = Vec::new();
    while let Some(at) = rest.windows(START.len()).position(|w| w == START) {
        assert!(
            rest[..at] == input[cursor..cursor + at],
            "bytes out of place"
        );
        cursor += at;
        let len = rest[at..].windows(2).position(|w| w == b"]\n").unwrap() + 2;
        let text = std::str::from_utf8(&rest[at..at + len]).unwrap();
        let count: u64 = text[START.len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(count > 0, "empty gap in {text:?}");
        gaps.push(count);
        cursor += count as usize;
        rest = &rest[at + len..];
    }
    assert!(rest == &input[cursor..], "the end differs");
    gaps
}

/// Writes `input` in chunks of 1 to `max_chunk` bytes, calling `after` after each.
fn write_randomly(
    writer: &mut LogWriter,
    input: &[u8],
    seed: u64,
    max_chunk: u64,
    mut after: impl FnMut(&mut Rng),
) {
    let mut rng = Rng(seed);
    let mut rest = input;
    while !rest.is_empty() {
        let n = (1 + rng.below(max_chunk)).min(rest.len() as u64) as usize;
        writer.write(&rest[..n]).unwrap();
        rest = &rest[n..];
        after(&mut rng);
    }
}

#[test]
fn writer_and_reader_can_move_to_a_blocking_thread() {
    fn send<T: Send + 'static>() {}
    send::<LogWriter>();
    send::<LogReader>();
    send::<LogError>();
}

#[test]
fn the_layout_keeps_half_the_cap_at_each_end_and_never_more_than_the_cap() {
    let default = LogLayout::new(DEFAULT_MAX_BYTES);
    assert_eq!(default.segment_size, 6_553_600);
    assert_eq!((default.head_segments, default.tail_segments), (8, 8));
    assert_eq!(default.head_bytes(), 50 * MIB);
    assert_eq!(default.tail_bytes(), 50 * MIB);

    let tiny = LogLayout::new(0);
    assert_eq!(tiny.max_bytes, 128 * KIB);
    assert_eq!(tiny.segment_size, 64 * KIB);
    assert_eq!((tiny.head_segments, tiny.tail_segments), (1, 1));

    let mut rng = Rng(7);
    for max in (0..2000).map(|_| rng.below(4 * 1024 * MIB)).chain([
        128 * KIB - 1,
        128 * KIB,
        128 * KIB + 1,
        MIB - 1,
        MIB,
        MIB + 1,
    ]) {
        let layout = LogLayout::new(max);
        assert!(layout.segment_size >= MIN_SEGMENT_SIZE);
        assert!(layout.head_bytes() <= layout.max_bytes / 2, "{layout:?}");
        assert!(layout.head_bytes() + layout.tail_bytes() <= layout.max_bytes);
        assert!(layout.head_segments >= 1 && layout.tail_segments >= 1);
    }
}

#[test]
fn the_marker_names_the_exact_count_and_the_kept_sizes() {
    assert_eq!(
        gap_marker(Some(12345), Some(LogLayout::new(DEFAULT_MAX_BYTES))),
        "\n[agentbox: 12345 bytes of output left out here; the log keeps the first 50 MiB \
         and the last 50 MiB]\n"
    );
    assert_eq!(
        gap_marker(None, Some(LogLayout::new(300 * KIB))),
        "\n[agentbox: output left out here; the log keeps the first 128 KiB and the last \
         128 KiB]\n"
    );
    assert_eq!(Size(1000).to_string(), "1000 bytes");
}

#[test]
fn the_omitted_file_reads_back_what_was_written() {
    let omitted = Omitted {
        bytes: 42,
        segments: 8..11,
        max_bytes: MIB,
    };
    assert_eq!(Omitted::parse(&omitted.to_string()), Ok(omitted));
    assert!(Omitted::parse("bytes x\nsegments 1..2\nmax_bytes 3\n").is_err());
    assert!(Omitted::parse("bytes 1\nmax_bytes 3\n").is_err());
}

#[test]
fn a_log_under_its_cap_reads_back_byte_exact_for_a_follower_and_a_late_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let input = data(700 * KIB, 1);
    let mut follower = LogReader::new(&dir);
    let mut followed = Vec::new();
    assert_eq!(follower.read_available(&mut followed).unwrap(), 0);

    let mut writer = LogWriter::create(&dir, SMALL_CAP).unwrap();
    write_randomly(&mut writer, &input, 2, 50_000, |_| {
        follower.read_available(&mut followed).unwrap();
    });
    assert_eq!(writer.total_written(), input.len() as u64);
    let totals = writer.finish();
    assert_eq!(totals.written, input.len() as u64);
    assert_eq!(totals.omitted, 0);
    assert_eq!(follower.read_available(&mut followed).unwrap(), 0);

    assert!(followed == input);
    assert!(read_all(&dir) == input);
}

#[test]
fn an_empty_log_reads_back_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let writer = LogWriter::create(&dir, SMALL_CAP).unwrap();
    assert_eq!(read_all(&dir), b"");
    writer.finish();
    assert_eq!(read_all(&dir), b"");
}

#[test]
fn a_log_far_over_its_cap_keeps_its_exact_head_and_tail_within_the_cap() {
    let layout = LogLayout::new(SMALL_CAP);
    let size = layout.segment_size;
    for extra in [0, 12345] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("task");
        let total = 300 * size + extra;
        let input = data(total, 3 + extra);
        let mut writer = LogWriter::create(&dir, SMALL_CAP).unwrap();
        write_randomly(&mut writer, &input, 4, 200_000, |_| {
            // The documented bound: the segments never hold more than the cap, and the
            // `omitted` file adds under 100 bytes.
            assert!(segments_on_disk(&dir) <= SMALL_CAP);
            assert!(log_size_on_disk(&dir).unwrap() < SMALL_CAP + 100);
        });

        let created = total.div_ceil(size);
        let first_kept = created - layout.tail_segments;
        let head = layout.head_bytes() as usize;
        let tail_start = (first_kept * size) as usize;
        let omitted = (first_kept - layout.head_segments) * size;
        assert_eq!(writer.omitted(), omitted);
        assert_eq!(
            writer.finish(),
            LogTotals {
                written: total,
                omitted
            }
        );

        let mut expected = input[..head].to_vec();
        expected.extend(marker(omitted, SMALL_CAP));
        expected.extend_from_slice(&input[tail_start..]);
        assert!(read_all(&dir) == expected, "extra {extra}");

        let text = std::fs::read_to_string(dir.join(OMITTED)).unwrap();
        assert_eq!(
            Omitted::parse(&text).unwrap(),
            Omitted {
                bytes: omitted,
                segments: layout.head_segments..first_kept,
                max_bytes: SMALL_CAP
            }
        );
        assert_eq!(segments_on_disk(&dir), total - omitted);
    }
}

#[test]
fn a_follower_polled_between_writes_sees_every_byte_once_through_rotations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let input = data(300 * 64 * KIB + 999, 5);
    let mut follower = LogReader::new(&dir);
    let mut followed = Vec::new();
    let mut writer = LogWriter::create(&dir, SMALL_CAP).unwrap();
    write_randomly(&mut writer, &input, 6, 100_000, |_| {
        follower.read_available(&mut followed).unwrap();
    });
    let omitted = writer.finish().omitted;
    assert!(omitted > 0);
    assert_eq!(follower.read_available(&mut followed).unwrap(), 0);
    assert!(
        followed == input,
        "the follower kept up, so nothing was skipped"
    );

    // A reader that comes late gets the same bytes, less the omitted middle.
    assert_eq!(gaps_in(&read_all(&dir), &input), [omitted]);
}

#[test]
fn a_slow_follower_skips_deleted_output_with_exact_counts_and_never_twice() {
    for seed in 1..6 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("task");
        // 64 KiB segments, one of head and one of tail: the follower falls behind often.
        let input = data(40 * 64 * KIB + seed * 777, seed);
        let mut follower = LogReader::new(&dir);
        let mut followed = Vec::new();
        let mut writer = LogWriter::create(&dir, 0).unwrap();
        write_randomly(&mut writer, &input, seed * 31, 90_000, |rng| {
            // Polled after one write in four, on average.
            if rng.below(4) == 0 {
                follower.read_available(&mut followed).unwrap();
            }
        });
        let omitted = writer.finish().omitted;
        follower.read_available(&mut followed).unwrap();
        assert_eq!(follower.read_available(&mut followed).unwrap(), 0);

        let gaps = gaps_in(&followed, &input);
        assert!(
            !gaps.is_empty(),
            "seed {seed}: the follower never fell behind"
        );
        assert!(gaps.iter().sum::<u64>() <= omitted);
    }
}

#[test]
fn a_segment_deleted_under_a_follower_is_read_to_its_end_then_the_gap_is_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let size = 64 * KIB;
    let input = data(3 * size + 10, 8);
    let (s, i) = (size as usize, &input);
    let mut writer = LogWriter::create(&dir, 0).unwrap();
    let mut follower = LogReader::new(&dir);
    let mut followed = Vec::new();

    writer.write(&i[..s + 1000]).unwrap();
    follower.read_available(&mut followed).unwrap();
    assert!(followed == i[..s + 1000]);
    // Fills segment 1, writes segment 2 (deleting 1, which the follower has open), starts
    // segment 3 (deleting 2, which the follower never saw).
    writer.write(&i[s + 1000..]).unwrap();
    assert!(!dir.join("000001").exists() && !dir.join("000002").exists());

    follower.read_available(&mut followed).unwrap();
    let mut expected = i[..2 * s].to_vec();
    expected.extend(marker(size, 0));
    expected.extend_from_slice(&i[3 * s..]);
    assert!(followed == expected);
    assert_eq!(follower.read_available(&mut followed).unwrap(), 0);
    assert_eq!(writer.finish().omitted, 2 * size);
}

#[test]
fn the_log_is_private_to_its_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut writer = LogWriter::create(&dir, 0).unwrap();
    writer.write(&data(5 * 64 * KIB, 9)).unwrap();
    let mode = |path: &Path| path.metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
        files += 1;
    }
    assert_eq!(files, 3, "head, tail and omitted");
}

#[test]
fn a_symlink_at_the_log_directory_is_refused_and_nothing_is_written_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let dir = tmp.path().join("task");
    std::os::unix::fs::symlink(&target, &dir).unwrap();
    let err = LogWriter::create(&dir, 0).unwrap_err();
    assert!(
        matches!(err, LogError::Symlink { ref path } if *path == dir),
        "{err}"
    );
    assert!(err.to_string().contains(&*dir.to_string_lossy()));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let err = LogWriter::create(&dangling, 0).unwrap_err();
    assert!(matches!(err, LogError::Symlink { .. }), "{err}");
    assert!(!tmp.path().join("nowhere").exists());

    assert!(matches!(
        log_size_on_disk(&dir),
        Err(LogError::Symlink { .. })
    ));
    assert!(matches!(
        LogReader::new(&dir).read_available(&mut Vec::new()),
        Err(LogError::Symlink { .. })
    ));
}

#[test]
fn a_file_at_the_log_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    std::fs::write(&dir, b"old single-file log").unwrap();
    let err = LogWriter::create(&dir, 0).unwrap_err();
    assert!(matches!(err, LogError::NotADirectory { .. }), "{err}");
    assert_eq!(std::fs::read(&dir).unwrap(), b"old single-file log");
}

#[test]
fn a_symlink_planted_as_a_segment_is_removed_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    std::fs::create_dir(&dir).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("000000")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(OMITTED_TMP)).unwrap();
    let mut writer = LogWriter::create(&dir, 0).unwrap();
    writer.write(b"output").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(read_all(&dir), b"output");
}

#[test]
fn a_new_run_starts_a_fresh_log_and_leaves_other_files_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let mut first = LogWriter::create(&dir, 0).unwrap();
    first.write(&data(20 * 64 * KIB, 10)).unwrap();
    assert!(first.finish().omitted > 0);
    std::fs::write(dir.join("notes"), b"kept").unwrap();

    let mut second = LogWriter::create(&dir, 0).unwrap();
    second.write(b"second run\n").unwrap();
    assert_eq!(second.omitted(), 0);
    assert_eq!(read_all(&dir), b"second run\n");
    assert_eq!(std::fs::read(dir.join("notes")).unwrap(), b"kept");
}

#[test]
fn a_missing_log_reads_as_empty_until_the_writer_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    assert_eq!(log_size_on_disk(&dir).unwrap(), 0);
    let mut reader = LogReader::new(&dir);
    let mut out = Vec::new();
    assert_eq!(reader.read_available(&mut out).unwrap(), 0);
    let mut writer = LogWriter::create(&dir, 0).unwrap();
    assert_eq!(reader.read_available(&mut out).unwrap(), 0);
    writer.write(b"late").unwrap();
    assert_eq!(reader.read_available(&mut out).unwrap(), 4);
    assert_eq!(out, b"late");
}

#[test]
fn a_failing_write_returns_an_error_and_the_writer_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let mut writer = LogWriter::create(&dir, 0).unwrap();
    writer.write(b"before").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // The open segment still takes bytes; the next one cannot be created.
    let err = writer.write(&data(3 * 64 * KIB, 11)).unwrap_err();
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
    assert!(writer.write(b"more").is_err());
    assert_eq!(writer.total_written(), 64 * KIB);
}

#[test]
#[ignore = "benchmark: cargo test --release --lib output -- --ignored --nocapture"]
fn bench_log() {
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("task");
    let total: u64 = 200 * 1_000_000;
    let chunk = data(64 * KIB, 12);
    let mb = |bytes: u64, seconds: f64| bytes as f64 / 1e6 / seconds;

    let start = Instant::now();
    let mut writer = LogWriter::create(&dir, DEFAULT_MAX_BYTES).unwrap();
    let mut written = 0;
    while written < total {
        let n = chunk.len().min((total - written) as usize);
        writer.write(&chunk[..n]).unwrap();
        written += n as u64;
    }
    let totals = writer.finish();
    let seconds = start.elapsed().as_secs_f64();
    let on_disk = log_size_on_disk(&dir).unwrap();
    eprintln!(
        "log writer, 200 MB in 64 KiB chunks, 100 MiB cap: {seconds:.3} s, {:.0} MB/s; \
         {on_disk} bytes on disk, {} omitted",
        mb(total, seconds),
        totals.omitted
    );

    let start = Instant::now();
    let mut sink = io::sink();
    let copied = LogReader::new(&dir).read_available(&mut sink).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "log reader, the same log to a sink: {seconds:.3} s, {:.0} MB/s",
        mb(copied as u64, seconds)
    );

    let path = tmp.path().join("plain.log");
    let start = Instant::now();
    let mut file = File::create(&path).unwrap();
    let mut written = 0;
    while written < total {
        let n = chunk.len().min((total - written) as usize);
        file.write_all(&chunk[..n]).unwrap();
        written += n as u64;
    }
    drop(file);
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "one plain file (the previous log), 200 MB in 64 KiB chunks: {seconds:.3} s, {:.0} MB/s",
        mb(total, seconds)
    );
}
