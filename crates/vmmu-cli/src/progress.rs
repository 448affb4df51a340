//! A progress bar for `vmmu run`, drawn on stderr only when both stdout and stderr are
//! terminals (so piped or redirected output, and `--json` into a file, carry no bar).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;
use vmmu_sim::machine::ProgressSnapshot;

/// The run's progress bar (elapsed time against the run time, with access and update counts).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar shown only if stdout and stderr are both terminals.
    pub fn for_terminal(duration: Duration) -> Progress {
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Progress::visible(duration)
        } else {
            Progress::hidden()
        }
    }

    /// A bar drawn on stderr.
    pub fn visible(duration: Duration) -> Progress {
        let bar =
            ProgressBar::with_draw_target(Some(millis(duration)), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed_precise} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress { bar }
    }

    /// A bar that draws nothing.
    pub fn hidden() -> Progress {
        Progress { bar: ProgressBar::hidden() }
    }

    /// Whether the bar draws nothing.
    #[cfg(test)]
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Shows `s`.
    pub fn update(&self, s: &ProgressSnapshot) {
        self.bar.set_position(millis(s.elapsed.min(s.duration)));
        self.bar.set_message(format!("{} accesses, {} memslot updates", s.accesses, s.updates));
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_when_not_a_terminal() {
        // Test harness output is captured: not a terminal.
        if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
            assert!(Progress::for_terminal(Duration::from_secs(1)).is_hidden());
        }
        let p = Progress::hidden();
        p.update(&ProgressSnapshot {
            elapsed: Duration::from_millis(5),
            duration: Duration::from_secs(1),
            accesses: 10,
            updates: 1,
        });
        p.finish();
        assert!(p.is_hidden());
    }
}
