//! Damaged variants of line-based inputs, for robustness and differential tests (feature
//! `generate`): a [`Mutation`] replaces a value by an edge case (0, all ones, 2^63, past
//! `u64`, negative, empty, not a number), drops a token, or drops, duplicates, swaps or cuts a
//! line. Line-level damage is generic ([`apply`]); what a token is depends on the format, so the
//! caller passes a line function ([`scenario_line`] for scenario files).
//!
//! A mutation names lines, tokens and values by index, taken modulo what exists, so any
//! mutation applies to any file and proptest's shrinking keeps it applicable.

use proptest::prelude::*;

/// Values that break careless arithmetic or parsing.
pub const EDGE_VALUES: &[&str] = &[
    "0",
    "1",
    "0x0",
    "0x1",
    "0xfff",
    "0x1000",
    "0xfffff000",
    "0x1000000000",
    "0x7fffffffffffffff",
    "0x8000000000000000",
    "0xffffffffffffffff",
    "0x10000000000000000",
    "18446744073709551615",
    "18446744073709551616",
    "4294967295",
    "4294967296",
    "65535",
    "65536",
    "32767",
    "-1",
    "",
    "0x",
    "x",
    "1e3",
    "9.5",
];

/// One damage to a file of lines; the numbers pick lines, tokens and values (taken modulo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Replace the value of a token by an edge value.
    Value {
        /// The line.
        line: usize,
        /// The token in the line.
        token: usize,
        /// The value ([`EDGE_VALUES`]).
        value: usize,
    },
    /// Drop a token.
    DropToken {
        /// The line.
        line: usize,
        /// The token in the line.
        token: usize,
    },
    /// Drop a line.
    DropLine(usize),
    /// Repeat a line.
    DuplicateLine(usize),
    /// Swap two lines.
    SwapLines(usize, usize),
    /// Cut a line at a byte (on a char boundary).
    Truncate {
        /// The line.
        line: usize,
        /// The byte.
        at: usize,
    },
}

/// A mutation; `value_weight` weighs value replacements against each other kind (weight 1 each).
pub fn mutation(value_weight: u32) -> impl Strategy<Value = Mutation> {
    let n = || 0usize..10_000;
    prop_oneof![
        value_weight => (n(), n(), n()).prop_map(|(line, token, value)| Mutation::Value { line, token, value }),
        1 => (n(), n()).prop_map(|(line, token)| Mutation::DropToken { line, token }),
        1 => n().prop_map(Mutation::DropLine),
        1 => n().prop_map(Mutation::DuplicateLine),
        1 => (n(), n()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => (n(), n()).prop_map(|(line, at)| Mutation::Truncate { line, at }),
    ]
}

/// Only value replacements: damage that keeps a file's shape, so most of it still parses.
pub fn value_mutation() -> impl Strategy<Value = Mutation> {
    let n = || 0usize..10_000;
    (n(), n(), n()).prop_map(|(line, token, value)| Mutation::Value { line, token, value })
}

/// Applies `m` to `lines`; a token-level mutation goes to `line_fn` with the line it picked.
pub fn apply(lines: &mut Vec<String>, m: &Mutation, line_fn: fn(&str, &Mutation) -> String) {
    if lines.is_empty() {
        return;
    }
    let n = lines.len();
    match *m {
        Mutation::Value { line, .. } | Mutation::DropToken { line, .. } => {
            lines[line % n] = line_fn(&lines[line % n], m);
        }
        Mutation::DropLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Truncate { line, at } => {
            let l = &mut lines[line % n];
            let mut cut = at % (l.len() + 1);
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
        }
    }
}

/// A scenario line's token-level damage: tokens are whitespace-separated, and a `key=value`
/// token keeps its key.
pub fn scenario_line(line: &str, m: &Mutation) -> String {
    let mut tokens: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    if tokens.is_empty() {
        return line.to_string();
    }
    match *m {
        Mutation::Value { token, value, .. } => {
            let i = token % tokens.len();
            let v = EDGE_VALUES[value % EDGE_VALUES.len()];
            tokens[i] = match tokens[i].split_once('=') {
                Some((k, _)) => format!("{k}={v}"),
                None => v.to_string(),
            };
        }
        Mutation::DropToken { token, .. } => {
            tokens.remove(token % tokens.len());
        }
        _ => {}
    }
    tokens.join(" ")
}

/// `text` (a scenario file) with `muts` applied in order.
pub fn damaged_scenario(text: &str, muts: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in muts {
        apply(&mut lines, m, scenario_line);
    }
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "vm vcpus=1\nmem m size=4K\nslot 1 gpa=0x10000000 size=4K mem=m\n";

    #[test]
    fn a_value_keeps_its_key() {
        let m = Mutation::Value { line: 2, token: 2, value: 10 };
        assert_eq!(
            damaged_scenario(TEXT, &[m]),
            "vm vcpus=1\nmem m size=4K\nslot 1 gpa=0xffffffffffffffff size=4K mem=m\n"
        );
    }

    #[test]
    fn line_damage_wraps_its_indices() {
        let mut lines: Vec<String> = TEXT.lines().map(str::to_string).collect();
        apply(&mut lines, &Mutation::SwapLines(3, 4), scenario_line);
        assert_eq!(lines[0], "mem m size=4K");
        apply(&mut lines, &Mutation::Truncate { line: 0, at: 5 }, scenario_line);
        assert_eq!(lines[0], "mem m");
        apply(&mut lines, &Mutation::DropLine(7), scenario_line);
        assert_eq!(lines.len(), 2);
        apply(&mut lines, &Mutation::DropToken { line: 0, token: 1 }, scenario_line);
        assert_eq!(lines[0], "mem");
    }
}
