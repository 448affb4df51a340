//! Observations: what one step showed, and their exact JSON Lines form.
//!
//! The [`fmt::Display`] of an [`Observation`] is its line (without the newline): keys in the
//! order of `scenarios.md`, addresses and values as lowercase hex without leading zeros (`"0x0"`
//! for zero), `len` as a decimal number. Two backends agree when their streams are equal, so this
//! form is written by hand and tested byte for byte. [`parse_observations`] reads such a stream
//! back (for `diff` and for checked-in expected outputs); it accepts only what the writer writes.

use serde_json::{Map, Value};
use std::fmt;

/// The result of a `slot` step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotResult {
    /// The ioctl succeeded.
    Ok,
    /// The ioctl failed with this errno name (`EINVAL`, `EEXIST`, ...).
    Err(String),
}

impl SlotResult {
    fn as_str(&self) -> &str {
        match self {
            SlotResult::Ok => "ok",
            SlotResult::Err(e) => e,
        }
    }
}

/// The result of a `dirty-log` step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirtyLogResult {
    /// The ioctl succeeded: the indexes of the dirty pages within the slot, ascending.
    Ok(Vec<u64>),
    /// The ioctl failed with this errno name (`ENOENT`, `EINVAL`).
    Err(String),
}

/// How a guest load ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadExit {
    /// It read RAM: the value loaded.
    None {
        /// The value loaded.
        value: u64,
    },
    /// It exited to the VMM as an MMIO read.
    Mmio {
        /// The guest-physical address of the exit.
        gpa: u64,
        /// Its length in bytes.
        len: u32,
        /// The value the guest loaded (the reply, truncated to `len`).
        value: u64,
    },
    /// A guest page fault (version 2): the guest's tables do not allow the access.
    PageFault {
        /// The faulting guest-virtual address (CR2).
        gva: u64,
        /// The architectural #PF error code (P, W, U, RSVD).
        error: u64,
    },
}

/// How a guest store ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteExit {
    /// It wrote RAM.
    None,
    /// It exited to the VMM as an MMIO write.
    Mmio {
        /// The guest-physical address of the exit.
        gpa: u64,
        /// Its length in bytes.
        len: u32,
        /// The data written (little-endian bytes as a number).
        data: u64,
    },
    /// A guest page fault (version 2).
    PageFault {
        /// The faulting guest-virtual address (CR2).
        gva: u64,
        /// The architectural #PF error code (P, W, U, RSVD).
        error: u64,
    },
}

/// One line of a backend's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A `slot` step.
    Slot {
        /// Step number.
        step: u32,
        /// `ok` or the errno name.
        result: SlotResult,
    },
    /// A `read` step.
    Read {
        /// Step number.
        step: u32,
        /// How it ended.
        exit: ReadExit,
    },
    /// A `write` step.
    Write {
        /// Step number.
        step: u32,
        /// How it ended.
        exit: WriteExit,
    },
    /// A `host-read` step.
    HostRead {
        /// Step number.
        step: u32,
        /// The value read.
        value: u64,
    },
    /// A `dirty-log` step.
    DirtyLog {
        /// Step number.
        step: u32,
        /// The pages, or the errno.
        result: DirtyLogResult,
    },
    /// A `clear-dirty-log` step.
    ClearDirtyLog {
        /// Step number.
        step: u32,
        /// `ok` or the errno name.
        result: SlotResult,
    },
    /// The backend cannot run this scenario as written (the only line of its output).
    Skipped {
        /// Why.
        reason: String,
    },
}

impl Observation {
    /// The step this observation belongs to (`None` for [`Observation::Skipped`]).
    pub fn step(&self) -> Option<u32> {
        match self {
            Observation::Slot { step, .. }
            | Observation::Read { step, .. }
            | Observation::Write { step, .. }
            | Observation::HostRead { step, .. }
            | Observation::DirtyLog { step, .. }
            | Observation::ClearDirtyLog { step, .. } => Some(*step),
            Observation::Skipped { .. } => None,
        }
    }
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observation::Slot { step, result } => {
                write!(f, r#"{{"step":{step},"op":"slot","result":"#)?;
                write!(f, "{}}}", Value::from(result.as_str()))
            }
            Observation::Read { step, exit: ReadExit::None { value } } => {
                write!(f, r#"{{"step":{step},"op":"read","exit":"none","value":"{value:#x}"}}"#)
            }
            Observation::Read { step, exit: ReadExit::Mmio { gpa, len, value } } => write!(
                f,
                r#"{{"step":{step},"op":"read","exit":"mmio","gpa":"{gpa:#x}","len":{len},"value":"{value:#x}"}}"#
            ),
            Observation::Read { step, exit: ReadExit::PageFault { gva, error } } => write!(
                f,
                r#"{{"step":{step},"op":"read","exit":"page-fault","gva":"{gva:#x}","error":"{error:#x}"}}"#
            ),
            Observation::Write { step, exit: WriteExit::PageFault { gva, error } } => write!(
                f,
                r#"{{"step":{step},"op":"write","exit":"page-fault","gva":"{gva:#x}","error":"{error:#x}"}}"#
            ),
            Observation::Write { step, exit: WriteExit::None } => {
                write!(f, r#"{{"step":{step},"op":"write","exit":"none"}}"#)
            }
            Observation::Write { step, exit: WriteExit::Mmio { gpa, len, data } } => write!(
                f,
                r#"{{"step":{step},"op":"write","exit":"mmio","gpa":"{gpa:#x}","len":{len},"data":"{data:#x}"}}"#
            ),
            Observation::HostRead { step, value } => {
                write!(f, r#"{{"step":{step},"op":"host-read","value":"{value:#x}"}}"#)
            }
            Observation::Skipped { reason } => {
                write!(f, r#"{{"skipped":{}}}"#, Value::from(reason.as_str()))
            }
            Observation::DirtyLog { step, result: DirtyLogResult::Ok(pages) } => {
                write!(f, r#"{{"step":{step},"op":"dirty-log","result":"ok","pages":["#)?;
                for (i, p) in pages.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, r#"{sep}"{p:#x}""#)?;
                }
                f.write_str("]}")
            }
            Observation::DirtyLog { step, result: DirtyLogResult::Err(e) } => {
                write!(
                    f,
                    r#"{{"step":{step},"op":"dirty-log","result":{}}}"#,
                    Value::from(e.as_str())
                )
            }
            Observation::ClearDirtyLog { step, result } => {
                write!(f, r#"{{"step":{step},"op":"clear-dirty-log","result":"#)?;
                write!(f, "{}}}", Value::from(result.as_str()))
            }
        }
    }
}

/// A line of an observation stream that is not what the writer writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("observation line {line}: {message}")]
pub struct ObservationError {
    /// Line, from 1.
    pub line: u32,
    /// What is wrong.
    pub message: String,
}

/// Reads a JSON Lines observation stream (blank lines are ignored). Every line must be exactly
/// what [`Observation`]'s writer produces, key order included.
pub fn parse_observations(text: &str) -> Result<Vec<Observation>, ObservationError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let raw = raw.trim_end_matches('\r');
        if raw.trim().is_empty() {
            continue;
        }
        // The message may quote the file (an unknown op, a bad number): its control characters
        // (a terminal's escape sequences) are shown escaped.
        let fail =
            |message: String| ObservationError {
                line,
                message: message
                    .chars()
                    .map(|c| {
                        if c.is_control() {
                            c.escape_default().to_string()
                        } else {
                            c.to_string()
                        }
                    })
                    .collect(),
            };
        let v: Value = serde_json::from_str(raw).map_err(|e| {
            // serde_json counts the line as its line 1: give the column of this line only.
            let full = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            match full.strip_suffix(&at) {
                Some(what) => fail(format!("not JSON: {what} at column {}", e.column())),
                None => fail(format!("not JSON: {full}")),
            }
        })?;
        let obj = v.as_object().ok_or_else(|| fail("not a JSON object".into()))?;
        let obs = from_object(obj).map_err(fail)?;
        let canonical = obs.to_string();
        if canonical != raw {
            return Err(fail(format!("not in canonical form; expected `{canonical}`")));
        }
        out.push(obs);
    }
    Ok(out)
}

fn from_object(o: &Map<String, Value>) -> Result<Observation, String> {
    let s = |k: &str| -> Result<&str, String> {
        o.get(k).and_then(Value::as_str).ok_or_else(|| format!("missing string field `{k}`"))
    };
    let n = |k: &str| -> Result<u64, String> {
        match o.get(k) {
            None => Err(format!("missing number field `{k}`")),
            Some(v) => v.as_u64().ok_or_else(|| {
                format!("field `{k}` must be a whole number from 0 to 2^64 - 1, not `{v}`")
            }),
        }
    };
    let hex = |k: &str| -> Result<u64, String> {
        let t = s(k)?;
        t.strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("field `{k}` is not a 0x hex number: `{t}`"))
    };
    // An errno as the spec prints it: its symbolic name (`EINVAL`), or `errno N` for one
    // without a name.
    let errno = |t: &str| -> Result<String, String> {
        let named = t.len() > 1
            && t.starts_with('E')
            && t.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        let numbered = t
            .strip_prefix("errno ")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if named || numbered {
            Ok(t.into())
        } else {
            Err(format!("field `result` is neither `ok` nor an errno name such as `EINVAL`: `{t}`"))
        }
    };
    if o.contains_key("skipped") {
        return Ok(Observation::Skipped { reason: s("skipped")?.into() });
    }
    let step = n("step")?;
    let step = u32::try_from(step).ok().filter(|&s| s >= 1).ok_or_else(|| {
        format!("field `step` is {step}: steps count lines from 1, up to {}", u32::MAX)
    })?;
    let len = || {
        let len = n("len")?;
        u32::try_from(len).map_err(|_| format!("field `len` is {len}: more than {}", u32::MAX))
    };
    Ok(match (s("op")?, o.get("exit").and_then(Value::as_str)) {
        ("slot", _) => Observation::Slot {
            step,
            result: match s("result")? {
                "ok" => SlotResult::Ok,
                e => SlotResult::Err(errno(e)?),
            },
        },
        ("read", Some("none")) => {
            Observation::Read { step, exit: ReadExit::None { value: hex("value")? } }
        }
        ("read", Some("mmio")) => Observation::Read {
            step,
            exit: ReadExit::Mmio { gpa: hex("gpa")?, len: len()?, value: hex("value")? },
        },
        ("write", Some("none")) => Observation::Write { step, exit: WriteExit::None },
        ("write", Some("mmio")) => Observation::Write {
            step,
            exit: WriteExit::Mmio { gpa: hex("gpa")?, len: len()?, data: hex("data")? },
        },
        ("read", Some("page-fault")) => Observation::Read {
            step,
            exit: ReadExit::PageFault { gva: hex("gva")?, error: hex("error")? },
        },
        ("write", Some("page-fault")) => Observation::Write {
            step,
            exit: WriteExit::PageFault { gva: hex("gva")?, error: hex("error")? },
        },
        ("host-read", _) => Observation::HostRead { step, value: hex("value")? },
        ("dirty-log", _) => Observation::DirtyLog {
            step,
            result: match s("result")? {
                "ok" => {
                    let list = o
                        .get("pages")
                        .and_then(Value::as_array)
                        .ok_or_else(|| "missing array field `pages`".to_string())?;
                    let mut pages = Vec::with_capacity(list.len());
                    for v in list {
                        let t = v.as_str().ok_or_else(|| "a page is not a string".to_string())?;
                        let p = t
                            .strip_prefix("0x")
                            .and_then(|h| u64::from_str_radix(h, 16).ok())
                            .ok_or_else(|| format!("page `{t}` is not a 0x hex number"))?;
                        pages.push(p);
                    }
                    DirtyLogResult::Ok(pages)
                }
                e => DirtyLogResult::Err(errno(e)?),
            },
        },
        ("clear-dirty-log", _) => Observation::ClearDirtyLog {
            step,
            result: match s("result")? {
                "ok" => SlotResult::Ok,
                e => SlotResult::Err(errno(e)?),
            },
        },
        (op, Some(exit)) => return Err(format!("unknown op/exit pair `{op}`/`{exit}`")),
        (op, None) => return Err(format!("unknown op `{op}`, or no `exit` where it needs one")),
    })
}

/// The first place two observation streams differ: `(index, left, right)`, where a missing
/// observation (one stream is shorter) is `None`. `None` overall when they are equal.
pub fn first_difference<'a>(
    left: &'a [Observation],
    right: &'a [Observation],
) -> Option<(usize, Option<&'a Observation>, Option<&'a Observation>)> {
    let n = left.len().max(right.len());
    (0..n).map(|i| (i, left.get(i), right.get(i))).find(|(_, a, b)| a != b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example stream of scenarios.md, byte for byte.
    const SPEC: &str = r#"{"step":3,"op":"slot","result":"ok"}
{"step":4,"op":"slot","result":"EEXIST"}
{"step":5,"op":"read","exit":"none","value":"0x2a"}
{"step":6,"op":"read","exit":"mmio","gpa":"0x100000000","len":4,"value":"0x0"}
{"step":7,"op":"write","exit":"none"}
{"step":8,"op":"write","exit":"mmio","gpa":"0x100000000","len":4,"data":"0xcafe"}
{"step":9,"op":"host-read","value":"0x1234"}
"#;

    fn spec_observations() -> Vec<Observation> {
        vec![
            Observation::Slot { step: 3, result: SlotResult::Ok },
            Observation::Slot { step: 4, result: SlotResult::Err("EEXIST".into()) },
            Observation::Read { step: 5, exit: ReadExit::None { value: 0x2a } },
            Observation::Read {
                step: 6,
                exit: ReadExit::Mmio { gpa: 0x1_0000_0000, len: 4, value: 0 },
            },
            Observation::Write { step: 7, exit: WriteExit::None },
            Observation::Write {
                step: 8,
                exit: WriteExit::Mmio { gpa: 0x1_0000_0000, len: 4, data: 0xcafe },
            },
            Observation::HostRead { step: 9, value: 0x1234 },
        ]
    }

    #[test]
    fn writer_matches_spec_bytes() {
        let text: String = spec_observations().iter().map(|o| format!("{o}\n")).collect();
        assert_eq!(text, SPEC);
    }

    #[test]
    fn dirty_log_observations_match_spec_and_round_trip() {
        let spec = r#"{"step":7,"op":"dirty-log","result":"ok","pages":["0x0","0x5"]}
{"step":7,"op":"dirty-log","result":"ENOENT"}
{"step":8,"op":"clear-dirty-log","result":"ok"}
{"step":9,"op":"dirty-log","result":"ok","pages":[]}
"#;
        let obs = vec![
            Observation::DirtyLog { step: 7, result: DirtyLogResult::Ok(vec![0, 5]) },
            Observation::DirtyLog { step: 7, result: DirtyLogResult::Err("ENOENT".into()) },
            Observation::ClearDirtyLog { step: 8, result: SlotResult::Ok },
            Observation::DirtyLog { step: 9, result: DirtyLogResult::Ok(vec![]) },
        ];
        let text: String = obs.iter().map(|o| format!("{o}\n")).collect();
        assert_eq!(text, spec);
        assert_eq!(parse_observations(spec).unwrap(), obs);
        for bad in [
            r#"{"step":7,"op":"dirty-log","result":"ok"}"#,
            r#"{"step":7,"op":"dirty-log","result":"ok","pages":["0x05"]}"#,
            r#"{"step":7,"op":"dirty-log","result":"ok","pages":[5]}"#,
        ] {
            assert!(parse_observations(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hex_is_lowercase_without_leading_zeros() {
        let o = Observation::HostRead { step: 1, value: 0xABCD_EF00_0000_0001 };
        assert_eq!(o.to_string(), r#"{"step":1,"op":"host-read","value":"0xabcdef0000000001"}"#);
        let o = Observation::Read { step: 12, exit: ReadExit::None { value: 0 } };
        assert_eq!(o.to_string(), r#"{"step":12,"op":"read","exit":"none","value":"0x0"}"#);
    }

    #[test]
    fn skipped_reason_is_escaped() {
        let o = Observation::Skipped { reason: "no \"SMM\"\\".into() };
        assert_eq!(o.to_string(), r#"{"skipped":"no \"SMM\"\\"}"#);
        assert_eq!(parse_observations(&o.to_string()).unwrap(), vec![o]);
    }

    #[test]
    fn reader_round_trips_and_rejects_other_forms() {
        assert_eq!(parse_observations(SPEC).unwrap(), spec_observations());
        for bad in [
            r#"{"op":"slot","step":3,"result":"ok"}"#,
            r#"{"step":5,"op":"read","exit":"none","value":"0x02a"}"#,
            r#"{"step":5,"op":"read","exit":"none","value":"0x2A"}"#,
            r#"{"step":5,"op":"read","exit":"none","value":42}"#,
            r#"{"step":5,"op":"read","exit":"mmio","gpa":"0x1","len":"4","value":"0x0"}"#,
            r#"{"step":5,"op":"frob"}"#,
            "not json",
        ] {
            let e = parse_observations(&format!("\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
        }
    }

    /// A step number the file cannot hold (0: steps count from 1; past `u32`) or a `len` past
    /// `u32` is refused with the value and the range (review 58b: "step out of range", and step
    /// 0 was taken, to show up later as a difference).
    #[test]
    fn a_step_or_len_out_of_range_is_named() {
        for (line, want) in [
            (r#"{"step":0,"op":"slot","result":"ok"}"#, "`step` is 0: steps count lines from 1"),
            (r#"{"step":4294967296,"op":"slot","result":"ok"}"#, "`step` is 4294967296"),
            (
                r#"{"step":1,"op":"read","exit":"mmio","gpa":"0x1","len":4294967296,"value":"0x0"}"#,
                "`len` is 4294967296: more than 4294967295",
            ),
        ] {
            let e = parse_observations(&format!("{line}\n")).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    /// A result is `ok` or an errno as the backends print it; anything else (an empty string,
    /// lower case, a number) is a malformed file, not an errno that differs (found by a
    /// code-quality audit: `"result":""` was read as an errno named "").
    #[test]
    fn a_result_that_is_no_errno_is_refused() {
        for good in ["EINVAL", "ENOENT", "E2BIG", "errno 4095"] {
            let text = format!("{{\"step\":1,\"op\":\"slot\",\"result\":\"{good}\"}}\n");
            let got = parse_observations(&text).unwrap();
            assert_eq!(got, [Observation::Slot { step: 1, result: SlotResult::Err(good.into()) }]);
        }
        for op in ["slot", "dirty-log", "clear-dirty-log"] {
            for bad in ["", "einval", "E", "errno ", "errno x", "OK", "22"] {
                let text = format!("{{\"step\":1,\"op\":\"{op}\",\"result\":\"{bad}\"}}\n");
                let e = parse_observations(&text).unwrap_err().to_string();
                assert!(e.contains("neither `ok` nor an errno name"), "{op} {bad:?}: {e}");
            }
        }
    }

    #[test]
    fn a_number_field_out_of_range_says_what_it_holds() {
        for bad in ["18446744073709551616", "-1", "1.5"] {
            let text = format!("{{\"step\":{bad},\"op\":\"slot\",\"result\":\"ok\"}}\n");
            let e = parse_observations(&text).unwrap_err().to_string();
            assert!(e.contains("field `step` must be a whole number"), "{e}");
            assert!(!e.contains("missing"), "{e}");
        }
        let e = parse_observations("{\"op\":\"slot\",\"result\":\"ok\"}\n").unwrap_err();
        assert!(e.to_string().contains("missing number field `step`"), "{e}");
    }

    #[test]
    fn a_line_that_is_not_json_names_its_column() {
        let e =
            parse_observations("{\"step\":1,\"op\":\"slot\",\"result\":\"ok\"}\n{\"step\":2,}\n")
                .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.ends_with("at column 11"), "{}", e.message);
        assert!(!e.message.contains("line 1"), "{}", e.message);
    }

    #[test]
    fn first_difference_finds_change_and_length_mismatch() {
        let a = spec_observations();
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[2] = Observation::Read { step: 5, exit: ReadExit::None { value: 0 } };
        assert_eq!(first_difference(&a, &b).map(|d| d.0), Some(2));
        let c = &a[..4];
        assert_eq!(first_difference(&a, c), Some((4, Some(&a[4]), None)));
    }
}
