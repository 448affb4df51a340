//! Reading an input file (a scenario, a trace, a recorded output) as the UTF-8 text its format
//! says it is. A file that is not UTF-8 is refused naming the line and column (from 1; a column
//! counts characters) of the first byte that is not, as a parse error names a line, rather than
//! with the standard library's "stream did not contain valid UTF-8", which names neither.

use crate::stdout::note;
use std::path::Path;

/// Why a file could not be read as text.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file, as given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A directory was named where a file goes.
    #[error("{path} is a directory, not a file: name the files in it (e.g. `{path}/*`)")]
    Directory {
        /// The directory, as given.
        path: String,
    },
    /// The input holds more than its [`Limit`] (or never ends, as `/dev/zero`).
    #[error("{path}: more than {} MiB; {}", .limit.bytes >> 20, .limit.why)]
    TooBig {
        /// The file, as given.
        path: String,
        /// The limit it passed.
        limit: Limit,
    },
    /// Standard input was named a second time (`vmmu diff - -`): it was read whole the first
    /// time, so the second would see an empty input.
    #[error("{path}: standard input was read already for an earlier `-`; name it once")]
    StdinTwice {
        /// The name as given (`-`).
        path: String,
    },
    /// The file is compressed (its first bytes are a compressor's signature).
    #[error("{path}: {format}-compressed, not text; decompress it first (e.g. `{tool} -d`)")]
    Compressed {
        /// The file, as given.
        path: String,
        /// The compression format.
        format: &'static str,
        /// The usual command that undoes it.
        tool: &'static str,
    },
    /// The file is not UTF-8.
    #[error("{path}:{line}:{column}: not UTF-8 text (byte {byte:#04x}); the format is UTF-8")]
    NotUtf8 {
        /// The file, as given.
        path: String,
        /// Line of the first bad byte, from 1.
        line: usize,
        /// Column of the first bad byte (in characters), from 1.
        column: usize,
        /// The first bad byte.
        byte: u8,
    },
}

/// The most bytes an input may hold, and what to say past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The largest input read.
    pub bytes: u64,
    /// Why, for the message.
    pub why: &'static str,
}

/// A scenario or a recorded output: a file read whole is held in memory several times over once
/// parsed.
pub const MAX_BYTES: Limit = Limit {
    bytes: 512 << 20,
    why: "inputs are read whole, and one this big is not a scenario or recording (split it)",
};

/// Any input that is not a regular file (standard input, a pipe, a device), whose size is not
/// known before it is read: a device that never ends (`/dev/zero`, `/dev/urandom`) would
/// otherwise be read until memory runs out.
pub const MAX_STREAM_BYTES: Limit = Limit {
    bytes: 512 << 20,
    why: "standard input, pipes and devices are read whole up to this size (give a large \
          trace as a regular file)",
};

/// A trace in a regular file: a long recorded boot may be hundreds of MiB (a 290 MB trace
/// replays in about 450 MB of memory), so traces get more room, still short of what would
/// exhaust a machine's memory.
pub const MAX_TRACE_BYTES: Limit = Limit {
    bytes: 4 << 30,
    why: "a trace is read whole and parsed in memory; cut the recording (the kit's small \
          conversion) or replay it in parts",
};

/// The text of `path` (`-`: standard input) up to `limit` bytes (up to [`MAX_STREAM_BYTES`]
/// when it is not a regular file), or why not.
pub fn read_text_within(path: &Path, limit: Limit) -> Result<String, InputError> {
    use std::io::Read;
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(InputError::Directory { path: shown });
    }
    let io = |source| InputError::Io { path: shown.clone(), source };
    let mut bytes = Vec::new();
    let limit = if path.as_os_str() == "-" {
        // Once per process: the first `-` reads standard input to its end.
        static STDIN_READ: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        if STDIN_READ.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Err(InputError::StdinTwice { path: shown });
        }
        let limit = stream_limit(limit);
        let stdin = std::io::stdin().lock();
        stdin.take(limit.bytes + 1).read_to_end(&mut bytes).map_err(io)?;
        limit
    } else {
        let f = std::fs::File::open(path).map_err(io)?;
        let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
        let limit = if regular { limit } else { stream_limit(limit) };
        f.take(limit.bytes + 1).read_to_end(&mut bytes).map_err(io)?;
        limit
    };
    if bytes.len() as u64 > limit.bytes {
        return Err(InputError::TooBig { path: shown, limit });
    }
    text(&shown, bytes)
}

/// The limit of an input of kind `limit` that is not a regular file: the kind's own when it is
/// no larger than [`MAX_STREAM_BYTES`] (a scenario from `/dev/zero` is told what a scenario
/// may hold, not to give "a large trace as a regular file"), else the stream's.
fn stream_limit(limit: Limit) -> Limit {
    if limit.bytes <= MAX_STREAM_BYTES.bytes {
        limit
    } else {
        MAX_STREAM_BYTES
    }
}

/// The text of a scenario or recorded output `path` (`-`: standard input), up to [`MAX_BYTES`].
pub fn read_text(path: &Path) -> Result<String, InputError> {
    read_text_within(path, MAX_BYTES)
}

/// What an input file looks like, from its first line that is not blank: a hint for a parse
/// error when the file was given to the wrong command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looks {
    /// A vmmu trace (`{"vmmu_trace":...`).
    Trace,
    /// A recorded output: observations (`{"step":...`, `{"skipped":...`).
    Recording,
    /// A scenario (a comment or a step keyword first).
    Scenario,
    /// A raw capture of the trace kit (`ftrace-capture.sh`'s `# vmmu-capture:` lines, or an
    /// ftrace buffer's `# tracer:` header), not yet converted into a trace.
    Capture,
}

impl Looks {
    /// What `text` looks like, if it looks like any of them.
    pub fn of(text: &str) -> Option<Looks> {
        let first = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        let word = first.split([' ', '\t']).next().unwrap_or("");
        if first.starts_with("{\"vmmu_trace\"") {
            Some(Looks::Trace)
        } else if first.starts_with("{\"step\"") || first.starts_with("{\"skipped\"") {
            Some(Looks::Recording)
        } else if first.starts_with("# vmmu-capture:") || first.starts_with("# tracer:") {
            // Before the scenario test: a capture's comment lines start with `#` too (hunt
            // 44r: `vmmu replay X.ftrace` was told the capture looked like a scenario).
            Some(Looks::Capture)
        } else if first.starts_with('#') || ["vm", "mem", "slot"].contains(&word) {
            Some(Looks::Scenario)
        } else {
            None
        }
    }

    /// What to do with a file that looks like this.
    pub fn hint(self) -> &'static str {
        match self {
            Looks::Trace => "this looks like a vmmu trace: `vmmu replay FILE` replays it",
            Looks::Recording => {
                "this looks like a recorded output (observations): `vmmu diff NAME.scn` compares \
                 a scenario with its NAME.jsonl (in ../expected, or --expected DIR)"
            }
            Looks::Scenario => {
                "this looks like a scenario: `vmmu scenario FILE` runs it, `vmmu diff FILE` \
                 compares it"
            }
            Looks::Capture => {
                "this looks like a raw capture of the trace kit (ftrace-capture.sh): convert it \
                 with `ftrace-to-trace.py FILE > NAME.trace.jsonl` (../shared/tools/trace), then \
                 `vmmu replay NAME.trace.jsonl`"
            }
        }
    }
}

/// Parses the scenario `text` of the file `shown` for command `cmd`. On a parse error it prints
/// the error (line, column, the message shortened) and, when the file looks like a trace or a
/// recorded output, which command takes it; the caller then treats the file as bad input.
pub fn parse_scenario(
    cmd: &str,
    shown: &dyn std::fmt::Display,
    text: &str,
) -> Option<vmmu_scenario::Scenario> {
    match vmmu_scenario::parse(text) {
        Ok(s) => Some(s),
        Err(e) => {
            note!("{shown}:{}:{}: {}", e.line, e.column, shorten(&e.kind.to_string()));
            if let Some(looks @ (Looks::Trace | Looks::Recording | Looks::Capture)) =
                Looks::of(text)
            {
                note!("vmmu {cmd}: {shown}: {}", looks.hint());
            }
            None
        }
    }
}

/// Most characters of an input-quoting message shown whole (a parse error may quote a word of
/// the file, and a garbage file's "word" can be megabytes long).
const SHOWN_CHARS: usize = 400;

/// `message` as shown on a terminal: whole up to [`SHOWN_CHARS`] characters, else its start
/// and end with how much was left out between them.
pub fn shorten(message: &str) -> String {
    vmmu_sim::report::elide(message, SHOWN_CHARS, SHOWN_CHARS - 100, 80).into_owned()
}

/// `bytes` as a `String`, or where they stop being UTF-8.
fn text(shown: &str, bytes: Vec<u8>) -> Result<String, InputError> {
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        if let Some((format, tool)) = compression(bytes) {
            return InputError::Compressed { path: shown.to_string(), format, tool };
        }
        let at = e.utf8_error().valid_up_to();
        // The prefix is valid UTF-8 by definition of `valid_up_to`.
        let good = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
        let line_start = good.rfind('\n').map_or(0, |i| i + 1);
        InputError::NotUtf8 {
            path: shown.to_string(),
            line: good.matches('\n').count() + 1,
            column: good[line_start..].chars().count() + 1,
            byte: bytes[at],
        }
    })
}

/// The compression format whose signature `bytes` start with, and the command that undoes it
/// (asked only of a file that is not UTF-8, so text that happens to start like one is text).
fn compression(bytes: &[u8]) -> Option<(&'static str, &'static str)> {
    const SIGNATURES: [(&[u8], &str, &str); 4] = [
        (&[0x1f, 0x8b], "gzip", "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz", "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", "zstd"),
        (b"BZh", "bzip2", "bzip2"),
    ];
    SIGNATURES.iter().find(|(magic, ..)| bytes.starts_with(magic)).map(|&(_, f, t)| (f, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compressed_file_is_named_as_such() {
        let gz = vec![0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03];
        let e = text("t.jsonl.gz", gz).expect_err("not text");
        assert_eq!(
            e.to_string(),
            "t.jsonl.gz: gzip-compressed, not text; decompress it first (e.g. `gzip -d`)"
        );
        let zst = vec![0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58];
        assert!(matches!(text("t.zst", zst), Err(InputError::Compressed { format: "zstd", .. })));
        // Text that starts like a bzip2 file is text.
        assert_eq!(text("t", b"BZh9 is a word".to_vec()).expect("text"), "BZh9 is a word");
    }

    #[test]
    fn tells_traces_recordings_and_scenarios_apart() {
        assert_eq!(Looks::of("\n{\"vmmu_trace\":1,\"source\":\"x\"}\n"), Some(Looks::Trace));
        assert_eq!(
            Looks::of("{\"step\":3,\"op\":\"slot\",\"result\":\"ok\"}"),
            Some(Looks::Recording)
        );
        assert_eq!(Looks::of("{\"skipped\":\"why\"}\n"), Some(Looks::Recording));
        assert_eq!(Looks::of("# header\nvm\n"), Some(Looks::Scenario));
        let capture = "# vmmu-capture: host: Linux 6.1 x86_64; kvm vendor module: kvm_intel\n\
                       # vmmu-capture: command: qemu-system-x86_64 -accel kvm\n# tracer: nop\n";
        assert_eq!(Looks::of(capture), Some(Looks::Capture));
        assert_eq!(Looks::of("# tracer: nop\n#\n"), Some(Looks::Capture));
        assert_eq!(Looks::of("mem b size=4K\n"), Some(Looks::Scenario));
        assert_eq!(Looks::of("\u{0}garbage"), None);
        assert_eq!(Looks::of(""), None);
    }

    #[test]
    fn a_regular_file_is_read_up_to_its_kinds_limit() {
        let dir = std::env::temp_dir().join(format!("vmmu-input-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.jsonl");
        std::fs::write(&f, "0123456789").unwrap();
        let small = Limit { bytes: 9, why: "test" };
        match read_text_within(&f, small) {
            Err(InputError::TooBig { limit, .. }) => assert_eq!(limit, small),
            other => panic!("{other:?}"),
        }
        let exact = Limit { bytes: 10, why: "test" };
        assert_eq!(read_text_within(&f, exact).unwrap(), "0123456789");
        // A trace may be far larger than a scenario; a device never gets more than a stream.
        const { assert!(MAX_TRACE_BYTES.bytes > MAX_BYTES.bytes) };
        const { assert!(MAX_STREAM_BYTES.bytes <= MAX_BYTES.bytes) };
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A scenario or recording read from a stream (`vmmu scenario /dev/zero`, `-`) is refused
    /// with the scenario's reason; only a trace, which may be larger as a regular file, is told
    /// to come as one.
    #[test]
    fn a_stream_past_its_limit_is_told_what_its_kind_allows() {
        assert_eq!(stream_limit(MAX_BYTES), MAX_BYTES);
        assert_eq!(stream_limit(MAX_TRACE_BYTES), MAX_STREAM_BYTES);
        let e = InputError::TooBig { path: "/dev/zero".into(), limit: stream_limit(MAX_BYTES) };
        assert!(!e.to_string().contains("trace"), "{e}");
        assert!(e.to_string().contains("not a scenario or recording"), "{e}");
        let e = InputError::TooBig { path: "-".into(), limit: stream_limit(MAX_TRACE_BYTES) };
        assert!(e.to_string().contains("give a large trace as a regular file"), "{e}");
    }

    #[test]
    fn long_messages_keep_their_ends() {
        assert_eq!(shorten("bad number `12`"), "bad number `12`");
        let long = format!("bad number `{}`: too big", "9".repeat(5000));
        let s = shorten(&long);
        assert!(s.len() < 500, "{s}");
        assert!(s.starts_with("bad number `999") && s.ends_with("999`: too big"), "{s}");
        assert!(s.contains("[... 4642 characters left out ...]"), "{s}");
    }

    #[test]
    fn names_the_line_and_column_of_the_first_bad_byte() {
        assert_eq!(text("f", b"vm\n".to_vec()).ok().as_deref(), Some("vm\n"));
        let e = text("f.scn", b"vm\nmem \xc3\xa9\xff size=1\n".to_vec()).unwrap_err();
        assert!(matches!(e, InputError::NotUtf8 { line: 2, column: 6, byte: 0xff, .. }), "{e:?}");
        assert_eq!(e.to_string(), "f.scn:2:6: not UTF-8 text (byte 0xff); the format is UTF-8");
        let e = text("t", b"\x80".to_vec()).unwrap_err();
        assert!(matches!(e, InputError::NotUtf8 { line: 1, column: 1, byte: 0x80, .. }));
    }
}
