//! The commands' results on stdout, without panicking: `println!` panics when stdout cannot be
//! written (`> /dev/full`, a closed pipe). A command writes through [`emit`] (or [`say!`])
//! instead and exits 1 when it could not, as `diff`, `replay` and `scenario` do.

use std::io::{ErrorKind, Write};

/// Writes `text` to stdout and flushes it. On failure, says why on stderr (prefixed with
/// `vmmu CMD:`; nothing for a closed pipe, whose reader left on purpose) and returns false.
pub fn emit(cmd: &str, text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::BrokenPipe => false,
        Err(e) => {
            note!("vmmu {cmd}: cannot write to stdout: {e}");
            false
        }
    }
}

/// `eprintln!` without its panic: a message that stderr cannot take (`2>/dev/full`, a pipe whose
/// reader left, as in `2>&1 | head -1`) is dropped, and the command ends with the exit status it
/// would have had (`eprintln!` panicked there, which made every such exit status 101).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

/// `println!` through [`emit`]: `say!("run", "{x}")` is true when the line was written.
macro_rules! say {
    ($cmd:expr, $($arg:tt)*) => {
        $crate::stdout::emit($cmd, &format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use say;
