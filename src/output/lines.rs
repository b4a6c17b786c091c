//! Splits one output stream (a task's stdout, or its stderr) into lines, in bounded memory.
//!
//! Why this exists: the first line splitter kept the stream in a buffer and searched the whole buffer
//! for '\n' after every chunk, so a task that printed 50 MB without a newline cost 136 s of CPU and
//! 50 MB of memory per stream. Here every byte is searched once (`memchr`, over the chunk as it
//! arrives), complete lines are copied straight out of the chunk, and only the unfinished line is
//! kept, never more than `max_line` bytes of it: a longer line leaves in pieces of at most `max_line`
//! bytes, each but the last marked `continued` so a renderer can show that the line goes on.
//!
//! Wiring: one `LineSplitter` per stream (lines of stdout and stderr interleave, so they must not
//! share one), `push` each chunk as it arrives, `finish` when the stream ends for the line that had
//! no newline. Pieces are cut on a UTF-8 character boundary when the bytes there are UTF-8, so a
//! lossy conversion of each piece does not turn one character into two replacement characters.

use std::mem;

/// The longest line held back waiting for its newline.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// The smallest `max_line` accepted: a piece never ends inside a UTF-8 character (up to 4 bytes), so
/// every piece must have room for one whole character.
const MIN_MAX_LINE: usize = 4;

/// One line of output, or one piece of a line longer than the splitter's `max_line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The bytes, without the '\n' and without one '\r' before it.
    pub bytes: Vec<u8>,
    /// The line goes on in the next piece. A continued piece is always followed by one more piece,
    /// from `push` or from `finish`, and it keeps any '\r' at its end.
    pub continued: bool,
}

impl Line {
    fn whole(mut bytes: Vec<u8>) -> Self {
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        Self {
            bytes,
            continued: false,
        }
    }

    fn piece(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            continued: true,
        }
    }
}

#[derive(Debug)]
pub struct LineSplitter {
    /// The line seen so far, with no '\n' in it and at most `max_line` bytes long.
    partial: Vec<u8>,
    max_line: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl LineSplitter {
    /// `max_line` below 4 is raised to 4 (see `MIN_MAX_LINE`).
    pub fn new(max_line: usize) -> Self {
        Self {
            partial: Vec::new(),
            max_line: max_line.max(MIN_MAX_LINE),
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes held back waiting for the rest of their line; never more than `max_line`.
    pub fn held(&self) -> usize {
        self.partial.len()
    }

    /// The lines and pieces that `chunk` completes, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        self.push_into(chunk, &mut lines);
        lines
    }

    /// `push`, appending to a vector the caller reuses.
    pub fn push_into(&mut self, chunk: &[u8], lines: &mut Vec<Line>) {
        let mut rest = chunk;
        while let Some(newline) = memchr::memchr(b'\n', rest) {
            let tail = self.cut_long(&rest[..newline], lines);
            let line = if self.partial.is_empty() {
                tail.to_vec()
            } else {
                self.partial.extend_from_slice(tail);
                mem::take(&mut self.partial)
            };
            lines.push(Line::whole(line));
            rest = &rest[newline + 1..];
        }
        let tail = self.cut_long(rest, lines);
        self.partial.extend_from_slice(tail);
    }

    /// The last line if the stream did not end with a newline (one trailing '\r' removed). Leaves
    /// the splitter empty, ready for another stream.
    pub fn finish(&mut self) -> Option<Line> {
        if self.partial.is_empty() {
            return None;
        }
        Some(Line::whole(mem::take(&mut self.partial)))
    }

    /// Emits, as continued pieces, as much of `partial` + `segment` (part of one line) as does not
    /// fit in `max_line`, and returns the rest of `segment`; `partial` + that rest fit in `max_line`.
    /// A full piece leaves only once a byte after it has been seen, so a line of exactly `max_line`
    /// bytes comes out whole.
    fn cut_long<'a>(&mut self, mut segment: &'a [u8], lines: &mut Vec<Line>) -> &'a [u8] {
        let max = self.max_line;
        while self.partial.len() + segment.len() > max {
            if self.partial.is_empty() {
                let cut = char_boundary(segment, max);
                lines.push(Line::piece(segment[..cut].to_vec()));
                segment = &segment[cut..];
                continue;
            }
            let fill = max - self.partial.len();
            self.partial.extend_from_slice(&segment[..fill]);
            segment = &segment[fill..];
            let cut = char_boundary(&self.partial, max);
            let mut carried = [0; MIN_MAX_LINE];
            let carried = &mut carried[..max - cut];
            carried.copy_from_slice(&self.partial[cut..]);
            self.partial.truncate(cut);
            // The line is long: the next piece will need the whole capacity too.
            let piece = mem::replace(&mut self.partial, Vec::with_capacity(max));
            self.partial.extend_from_slice(carried);
            lines.push(Line::piece(piece));
        }
        segment
    }
}

/// Where to cut `bytes` at or just before `at` so as not to split a UTF-8 character: moves back over
/// at most three bytes, and only when they start a character that would end past `at`. Never
/// returns 0, so every piece has at least one byte.
fn char_boundary(bytes: &[u8], at: usize) -> usize {
    for back in 1..=at.min(3) {
        let byte = bytes[at - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let len = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if len > back && at > back {
            at - back
        } else {
            at
        };
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[Line]) -> Vec<(String, bool)> {
        lines
            .iter()
            .map(|l| (String::from_utf8(l.bytes.clone()).unwrap(), l.continued))
            .collect()
    }

    fn whole(s: &str) -> (String, bool) {
        (s.to_owned(), false)
    }

    /// Feeds every chunk, then finishes; asserts the held bytes stay within the cap throughout.
    fn split_all(splitter: &mut LineSplitter, chunks: &[&[u8]]) -> Vec<Line> {
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter.push_into(chunk, &mut lines);
            assert!(splitter.held() <= splitter.max_line());
        }
        lines.extend(splitter.finish());
        assert_eq!(splitter.held(), 0);
        lines
    }

    /// A deterministic xorshift generator: the same "random" chunkings on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn lines_split_across_chunk_boundaries_come_out_whole() {
        let mut splitter = LineSplitter::default();
        let lines = split_all(&mut splitter, &[b"hel", b"lo\nwor", b"ld", b"\n!\n"]);
        assert_eq!(texts(&lines), [whole("hello"), whole("world"), whole("!")]);
    }

    #[test]
    fn a_chunk_holding_many_lines_yields_them_all_in_order() {
        let mut splitter = LineSplitter::default();
        let lines = splitter.push(b"a\nbb\nccc\ndd");
        assert_eq!(texts(&lines), [whole("a"), whole("bb"), whole("ccc")]);
        assert_eq!(splitter.held(), 2);
        assert_eq!(texts(&[splitter.finish().unwrap()]), [whole("dd")]);
    }

    #[test]
    fn crlf_loses_its_cr_even_when_the_lf_comes_in_the_next_chunk() {
        let mut splitter = LineSplitter::default();
        let lines = split_all(&mut splitter, &[b"dos\r\nsplit\r", b"\nlast\r"]);
        assert_eq!(texts(&lines), [whole("dos"), whole("split"), whole("last")]);
    }

    #[test]
    fn only_one_cr_is_removed_and_inner_crs_stay() {
        let mut splitter = LineSplitter::default();
        let lines = split_all(&mut splitter, &[b"a\rb\r\r\n"]);
        assert_eq!(texts(&lines), [whole("a\rb\r")]);
    }

    #[test]
    fn empty_lines_are_lines() {
        let mut splitter = LineSplitter::default();
        let lines = split_all(&mut splitter, &[b"\n\n", b"\r\n", b"x\n", b"\n"]);
        assert_eq!(
            texts(&lines),
            [whole(""), whole(""), whole(""), whole("x"), whole("")]
        );
    }

    #[test]
    fn finish_without_a_partial_line_yields_nothing() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.finish(), None);
        assert_eq!(texts(&splitter.push(b"a\n")), [whole("a")]);
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn a_line_of_exactly_the_cap_comes_out_whole() {
        let mut splitter = LineSplitter::new(8);
        let lines = split_all(&mut splitter, &[b"1234", b"5678", b"\n12345678"]);
        assert_eq!(texts(&lines), [whole("12345678"), whole("12345678")]);
    }

    #[test]
    fn a_line_one_byte_over_the_cap_comes_out_in_two_pieces() {
        let mut splitter = LineSplitter::new(8);
        let lines = split_all(&mut splitter, &[b"12345678", b"9\n"]);
        assert_eq!(texts(&lines), [("12345678".to_owned(), true), whole("9")]);
    }

    #[test]
    fn a_long_line_inside_one_chunk_is_cut_without_going_through_the_buffer() {
        let mut splitter = LineSplitter::new(4);
        let lines = splitter.push(b"abcdefghij\nk");
        assert_eq!(
            texts(&lines),
            [
                ("abcd".to_owned(), true),
                ("efgh".to_owned(), true),
                whole("ij")
            ]
        );
        assert_eq!(splitter.held(), 1);
    }

    #[test]
    fn a_continued_piece_keeps_its_cr_and_a_crlf_after_a_full_piece_ends_in_an_empty_piece() {
        let mut splitter = LineSplitter::new(4);
        let lines = split_all(&mut splitter, &[b"abc\r", b"d\r\n", b"wxyz\r\n"]);
        assert_eq!(
            texts(&lines),
            [
                ("abc\r".to_owned(), true),
                whole("d"),
                ("wxyz".to_owned(), true),
                whole("")
            ]
        );
    }

    #[test]
    fn pieces_are_not_cut_inside_a_utf8_character() {
        // "é" is two bytes, "€" three, "𝄞" four: with a cap of 5 every cut lands mid-character.
        let text = "aé€𝄞bé€𝄞c";
        for chunk_size in 1..=text.len() {
            let mut splitter = LineSplitter::new(5);
            let chunks: Vec<&[u8]> = text.as_bytes().chunks(chunk_size).collect();
            let lines = split_all(&mut splitter, &chunks);
            let mut joined = String::new();
            for line in &lines {
                assert!(line.bytes.len() <= 5);
                joined.push_str(std::str::from_utf8(&line.bytes).expect("cut on a boundary"));
            }
            assert_eq!(joined, text, "chunks of {chunk_size}");
        }
    }

    #[test]
    fn invalid_utf8_is_still_cut_at_the_cap() {
        let mut splitter = LineSplitter::new(4);
        let lines = split_all(&mut splitter, &[&[0xF0, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0]]);
        let sizes: Vec<usize> = lines.iter().map(|l| l.bytes.len()).collect();
        assert!(sizes.iter().all(|&n| (1..=4).contains(&n)), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 6);
    }

    #[test]
    fn a_cap_below_four_is_raised_to_four() {
        assert_eq!(LineSplitter::new(0).max_line(), 4);
        let mut splitter = LineSplitter::new(1);
        let lines = split_all(&mut splitter, &["€€".as_bytes()]);
        assert_eq!(texts(&lines), [("€".to_owned(), true), whole("€")]);
    }

    #[test]
    fn a_10_mib_line_in_4_kib_chunks_comes_out_as_ten_1_mib_pieces_and_the_rest() {
        let rest = 1000;
        let len = 10 * DEFAULT_MAX_LINE + rest;
        let input: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        for chunk in input.chunks(4096) {
            splitter.push_into(chunk, &mut lines);
            assert!(splitter.held() <= DEFAULT_MAX_LINE);
        }
        splitter.push_into(b"\n", &mut lines);
        assert_eq!(splitter.held(), 0);

        assert_eq!(lines.len(), 11);
        for (i, piece) in lines[..10].iter().enumerate() {
            assert!(piece.continued);
            let start = i * DEFAULT_MAX_LINE;
            assert!(piece.bytes == input[start..start + DEFAULT_MAX_LINE]);
        }
        assert!(!lines[10].continued);
        assert!(lines[10].bytes == input[len - rest..]);
    }

    #[test]
    fn a_50_mb_line_in_64_kib_chunks_never_holds_more_than_the_cap() {
        let len = 50_000_000;
        let chunk = vec![b'x'; 64 * 1024];
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        let mut fed = 0;
        let mut out = 0;
        while fed < len {
            let n = chunk.len().min(len - fed);
            splitter.push_into(&chunk[..n], &mut lines);
            fed += n;
            assert!(splitter.held() <= DEFAULT_MAX_LINE);
            for line in lines.drain(..) {
                assert!(line.continued && line.bytes.len() == DEFAULT_MAX_LINE);
                out += line.bytes.len();
            }
        }
        let last = splitter.finish().unwrap();
        assert!(!last.continued);
        assert_eq!(out + last.bytes.len(), len);
        assert_eq!(len / DEFAULT_MAX_LINE, out / DEFAULT_MAX_LINE);
    }

    #[test]
    fn random_chunkings_lose_and_invent_no_byte() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..200 {
            let cap = 4 + rng.below(40);
            let len = rng.below(2000);
            // Mostly letters, some newlines, the odd multibyte character; no '\r', which is dropped.
            let alphabet: [&[u8]; 4] = [b"a", b"z", b"\n", "€".as_bytes()];
            let mut input = Vec::new();
            while input.len() < len {
                let pick = rng.below(20);
                input.extend_from_slice(alphabet[if pick < 12 { pick % 2 } else { pick % 4 }]);
            }

            let mut splitter = LineSplitter::new(cap);
            let mut lines = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(3 * cap));
                splitter.push_into(&rest[..n], &mut lines);
                assert!(splitter.held() <= cap);
                rest = &rest[n..];
            }
            let last = splitter.finish();

            let mut rebuilt = Vec::new();
            for line in &lines {
                assert!(line.bytes.len() <= cap);
                assert!(!line.bytes.contains(&b'\n'));
                rebuilt.extend_from_slice(&line.bytes);
                if !line.continued {
                    rebuilt.push(b'\n');
                }
            }
            if let Some(last) = last {
                assert!(!last.continued);
                rebuilt.extend_from_slice(&last.bytes);
            } else {
                assert!(lines.last().is_none_or(|l| !l.continued));
            }
            assert!(rebuilt == input, "round {round}, cap {cap}");
        }
    }

    /// The splitter batch used before: it searched the whole buffer after every chunk.
    fn quadratic_split(buffer: &mut Vec<u8>, chunk: &[u8]) -> Vec<Vec<u8>> {
        buffer.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(newline) = buffer.iter().position(|&b| b == b'\n') {
            let rest = buffer.split_off(newline + 1);
            let mut line = std::mem::replace(buffer, rest);
            line.pop();
            lines.push(line);
        }
        lines
    }

    #[test]
    #[ignore = "benchmark: cargo test --release --lib output -- --ignored --nocapture"]
    fn bench_splitter() {
        use std::time::Instant;
        let mb = |bytes: usize, seconds: f64| bytes as f64 / 1e6 / seconds;

        let chunk = vec![b'x'; 64 * 1024];
        let chunks = 50_000_000 / chunk.len() + 1;
        let len = chunks * chunk.len();
        let start = Instant::now();
        let mut splitter = LineSplitter::default();
        let mut pieces = 0;
        for _ in 0..chunks {
            pieces += splitter.push(&chunk).len();
        }
        pieces += usize::from(splitter.finish().is_some());
        let seconds = start.elapsed().as_secs_f64();
        eprintln!(
            "splitter, one {len}-byte line in 64 KiB chunks: {seconds:.3} s, {:.0} MB/s, {pieces} pieces",
            mb(len, seconds)
        );

        let line = [b"0123456789".repeat(8).as_slice(), b"\n"].concat();
        let text: Vec<u8> = line.repeat(50_000_000 / line.len());
        let start = Instant::now();
        let mut lines = 0;
        for chunk in text.chunks(64 * 1024) {
            lines += splitter.push(chunk).len();
        }
        let seconds = start.elapsed().as_secs_f64();
        eprintln!(
            "splitter, 50 MB of 81-byte lines in 64 KiB chunks: {seconds:.3} s, {:.0} MB/s, {:.1} M lines/s",
            mb(text.len(), seconds),
            lines as f64 / 1e6 / seconds
        );

        for len in [1_000_000, 2_000_000, 4_000_000] {
            let start = Instant::now();
            let mut buffer = Vec::new();
            for _ in 0..len / chunk.len() {
                quadratic_split(&mut buffer, &chunk);
            }
            let seconds = start.elapsed().as_secs_f64();
            eprintln!(
                "previous splitter, one {} MB line in 64 KiB chunks: {seconds:.3} s, {:.1} MB/s",
                len / 1_000_000,
                mb(len, seconds)
            );
        }
    }
}
