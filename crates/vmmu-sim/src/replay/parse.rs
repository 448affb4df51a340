//! The reader of vmmu traces, version 1 (`../shared/design/traces.md`, the contract with the
//! recording kit): a header line, events in time order, an optional summary line.
//!
//! The reader is strict, as the contract asks: keys in the order the contract shows and no others,
//! `t` with exactly six decimals and never decreasing, lowercase hex without leading zeros, known
//! `op`s only, MMIO accesses of 1 to [`MAX_MMIO_LEN`] bytes that do not cross a 4 KiB page (see
//! [`MAX_MMIO_LEN`] for why not only 1, 2, 4 and 8), a `null` MMIO value only for a read with
//! `"exit":"user"` (the one kind the kit leaves without a value), `num_pages` within the ioctl's
//! `u32`, and a summary (when present) that is the last line, has `op` first and each key once,
//! the keys of the contract's table (any subset) of their type, and whose `events` counts match
//! the file. Keys the table does not name are left unchecked: the summary is not an event line. Every error names the 1-based line it was found on.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The trace format version this reader knows.
pub const TRACE_VERSION: u64 = 1;

/// The longest MMIO access the reader accepts. The contract names lengths 1, 2, 4 and 8, but a
/// recording holds what KVM's `kvm_mmio` tracepoint saw, which is the emulator's fragment: KVM
/// splits an access that crosses a page at the boundary (a 4-byte store at `0xb8fff` is traced as
/// 1 byte at `0xb8fff` and 3 bytes at `0xb9000`; an 8-byte one can leave 3, 5, 6 or 7), and
/// traces an SSE store or load (`movdqu`, 16 bytes) or a descriptor-table store (`sgdt`, 10) as
/// one event. Both were recorded with the kit (QEMU 7.2 + SeaBIOS, a boot sector writing VGA
/// text memory). 32 leaves room for an emulated AVX move; `value` still holds at most 8 bytes
/// (the tracepoint keeps the first 8).
pub const MAX_MMIO_LEN: u64 = 32;

/// The widest guest-physical address x86 has (MAXPHYADDR 52): a recorded access reaches below
/// 2^52 (a slot request may name more, and KVM refuses it).
pub const GUEST_PHYS_BITS: u32 = 52;

/// Why a trace is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong there.
    pub kind: ParseErrorKind,
}

/// What is wrong with a line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The file is empty.
    #[error("empty file: a trace starts with the header {{\"vmmu_trace\":1,\"source\":\"...\"}}")]
    Empty,
    /// A blank line.
    #[error("blank line (a trace has one JSON object per line and no blank lines)")]
    Blank,
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    Json(String),
    /// Keys out of order, missing or extra.
    #[error("{what}: keys must be exactly {expected} in that order, found {found}")]
    Keys {
        /// The kind of line.
        what: String,
        /// The keys the contract shows.
        expected: String,
        /// The keys found.
        found: String,
    },
    /// The header's keys are not `vmmu_trace` and `source`, each once.
    #[error("header: keys must be vmmu_trace and source, each once (in either order), found {0}")]
    HeaderKeys(String),
    /// The summary's keys are not `op` first, then each key once.
    #[error("summary: {problem} (keys: \"op\" first, then each key once; found {found})")]
    SummaryKeys {
        /// What is wrong.
        problem: String,
        /// The keys found.
        found: String,
    },
    /// The header's version is not 1.
    #[error("vmmu_trace is {0}; this reader knows version 1 only (the JSON integer `1`)")]
    Version(String),
    /// An unknown `op`.
    #[error("unknown op {0:?} (v1 has slot, mmio, get-dirty-log, clear-dirty-log, kvm, summary)")]
    UnknownOp(String),
    /// A field of the wrong type or format.
    #[error("field {field:?}: {problem}")]
    Field {
        /// The key.
        field: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// `t` went backwards.
    #[error("t {t} is before the previous event's t {previous}: events must be in time order")]
    TimeBackwards {
        /// This event's time.
        t: String,
        /// The previous event's time.
        previous: String,
    },
    /// The first event's `t` is not 0.
    #[error("the first event has t {0}; it must be 0.000000")]
    FirstTime(String),
    /// An MMIO access crosses a page.
    #[error("mmio access at {gpa:#x} of {len} bytes crosses a 4 KiB page (KVM splits those)")]
    CrossesPage {
        /// The address.
        gpa: u64,
        /// The length.
        len: u64,
    },
    /// A line after the summary.
    #[error("a line after the summary (the summary must be the last line)")]
    AfterSummary,
    /// The summary's counts do not match the file.
    #[error("summary says {want} {op} event(s), the file has {have} (truncated or edited trace?)")]
    CountMismatch {
        /// The kind.
        op: EventOp,
        /// Summary's count.
        want: u64,
        /// Lines found.
        have: u64,
    },
    /// The summary's `events` leaves out a kind the file has lines of.
    #[error(
        "summary's \"events\" gives no count of {op} events, and the file has {have}: a reader \
         cannot check it for truncation (traces.md: \"events\" counts the lines of each kind; \
         give \"{op}\":{have}, or leave out \"events\")"
    )]
    CountMissing {
        /// The kind.
        op: EventOp,
        /// Lines found.
        have: u64,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> ParseErrorKind {
    ParseErrorKind::Field { field, problem: problem.into() }
}

/// `dir` of an MMIO event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// A load.
    Read,
    /// A store.
    Write,
}

/// `exit` of an MMIO event: where the recording host handled the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `KVM_EXIT_MMIO` to the VMM.
    User,
    /// An in-kernel device or a coalesced-MMIO ring.
    Kernel,
}

/// One `KVM_SET_USER_MEMORY_REGION` as the VMM made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotEvent {
    /// Address space.
    pub as_id: u16,
    /// Slot id in the address space.
    pub id: u16,
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub dirty_log: bool,
    /// `KVM_MEM_READONLY`.
    pub readonly: bool,
    /// `guest_phys_addr`.
    pub gpa: u64,
    /// `memory_size` (0 deletes).
    pub size: u64,
    /// `userspace_addr` in the recording VMM.
    pub uaddr: u64,
}

/// One guest access KVM emulated as MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioEvent {
    /// Load or store.
    pub dir: Dir,
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes: 1 to [`MAX_MMIO_LEN`] (1, 2, 4 or 8 for almost every access; other lengths are
    /// page-crossing fragments and SSE or descriptor-table accesses as KVM traced them).
    pub len: u64,
    /// Value written or read (`None`: a read never completed).
    pub value: Option<u64>,
    /// Where it was handled.
    pub exit: Exit,
}

/// What an event line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `slot`.
    Slot(SlotEvent),
    /// `mmio`.
    Mmio(MmioEvent),
    /// `get-dirty-log`.
    GetDirtyLog {
        /// Address space.
        as_id: u16,
        /// Slot id.
        id: u16,
    },
    /// `clear-dirty-log`.
    ClearDirtyLog {
        /// Address space.
        as_id: u16,
        /// Slot id.
        id: u16,
        /// First page, from the slot's start.
        first_page: u64,
        /// Pages (`num_pages` of `struct kvm_clear_dirty_log`, a `u32`).
        num_pages: u32,
    },
    /// `kvm` with `event` `zap_all_fast`: the recording KVM's `kvm_mmu_zap_all_fast`.
    KvmZapAllFast,
}

impl EventKind {
    /// The kind of line it came from.
    pub const fn op(&self) -> EventOp {
        match self {
            EventKind::Slot(_) => EventOp::Slot,
            EventKind::Mmio(_) => EventOp::Mmio,
            EventKind::GetDirtyLog { .. } => EventOp::GetDirtyLog,
            EventKind::ClearDirtyLog { .. } => EventOp::ClearDirtyLog,
            EventKind::KvmZapAllFast => EventOp::Kvm,
        }
    }
}

/// The kinds of event line of v1, as their `op` (and the summary's `events`) name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventOp {
    /// `slot`.
    Slot,
    /// `mmio`.
    Mmio,
    /// `get-dirty-log`.
    GetDirtyLog,
    /// `clear-dirty-log`.
    ClearDirtyLog,
    /// `kvm`.
    Kvm,
}

impl EventOp {
    /// Every kind, in the order traces.md lists them.
    pub const ALL: [EventOp; 5] =
        [EventOp::Slot, EventOp::Mmio, EventOp::GetDirtyLog, EventOp::ClearDirtyLog, EventOp::Kvm];

    /// The `op` name.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventOp::Slot => "slot",
            EventOp::Mmio => "mmio",
            EventOp::GetDirtyLog => "get-dirty-log",
            EventOp::ClearDirtyLog => "clear-dirty-log",
            EventOp::Kvm => "kvm",
        }
    }

    /// The kind an `op` name names, if v1 has it.
    pub fn from_name(name: &str) -> Option<EventOp> {
        EventOp::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

impl core::fmt::Display for EventOp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event with where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// 1-based line number in the file.
    pub line: usize,
    /// Microseconds since the first event.
    pub t_us: u64,
    /// What happened.
    pub kind: EventKind,
}

/// The parts of the summary line a replayer uses (the rest is kept as JSON). A count the
/// summary does not give is `None`: unknown, not 0 (a hand-written summary may give any subset
/// of the contract's keys).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Summary {
    /// Kernel-handled MMIO events left out of a reduced trace.
    pub kernel_mmio_dropped: Option<u64>,
    /// Events the capture lost (then verdicts are not to be trusted).
    pub lost_events: Option<u64>,
    /// Threads that ran `KVM_RUN`.
    pub vcpu_threads: Option<u64>,
    /// `KVM_RUN` returns by reason (`userspace_exits`; empty when the summary has none).
    pub userspace_exits: BTreeMap<String, u64>,
}

/// A parsed trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The header's `source`.
    pub source: String,
    /// The events in file order.
    pub events: Vec<Event>,
    /// The summary line, if present.
    pub summary: Option<Summary>,
}

impl Trace {
    /// Number of events of kind `op`.
    pub fn count(&self, op: EventOp) -> u64 {
        self.events.iter().filter(|e| e.kind.op() == op).count() as u64
    }

    /// Whether an event names address space 1 (SMRAM): a slot request or a dirty-log call. The
    /// recording host then had an SMM address space, and a replayer gives its VM one too, so
    /// such a call meets KVM's rules for that address space (a dirty-log call on a slot that was
    /// never made there is `ENOENT`, not `EINVAL`).
    pub fn uses_address_space_1(&self) -> bool {
        self.events.iter().any(|e| match e.kind {
            EventKind::Slot(s) => s.as_id == 1,
            EventKind::GetDirtyLog { as_id, .. } | EventKind::ClearDirtyLog { as_id, .. } => {
                as_id == 1
            }
            EventKind::Mmio(_) | EventKind::KvmZapAllFast => false,
        })
    }
}

/// A JSON object with its keys in file order (values unparsed).
struct Ordered<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Ordered<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Ordered<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Ordered<'a>, M::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, &'de RawValue>()? {
                    v.push((k, val));
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Ordered<'a> {
    fn parse(text: &'a str) -> Result<Ordered<'a>, ParseErrorKind> {
        serde_json::from_str(text).map_err(|e| ParseErrorKind::Json(json_error(&e, text)))
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn expect_keys(&self, what: &str, expected: &[&str]) -> Result<(), ParseErrorKind> {
        let found = self.keys();
        if found != expected {
            return Err(ParseErrorKind::Keys {
                what: what.to_string(),
                expected: expected.join(","),
                found: found.join(","),
            });
        }
        Ok(())
    }

    fn raw(&self, key: &'static str) -> Result<&'a str, ParseErrorKind> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.get())
            .ok_or_else(|| field(key, "missing"))
    }

    fn string(&self, key: &'static str) -> Result<String, ParseErrorKind> {
        serde_json::from_str(self.raw(key)?).map_err(|_| field(key, "must be a JSON string"))
    }

    fn int(&self, key: &'static str) -> Result<u64, ParseErrorKind> {
        let raw = self.raw(key)?;
        if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(field(
                key,
                format!("must be a plain non-negative JSON integer, not {raw}"),
            ));
        }
        raw.parse().map_err(|_| field(key, format!("{raw} is too large")))
    }

    fn u16(&self, key: &'static str) -> Result<u16, ParseErrorKind> {
        let v = self.int(key)?;
        u16::try_from(v).map_err(|_| field(key, format!("{v} does not fit 16 bits")))
    }

    /// A `u32` field of an ioctl struct (`num_pages` of `struct kvm_clear_dirty_log`).
    fn u32(&self, key: &'static str) -> Result<u32, ParseErrorKind> {
        let v = self.int(key)?;
        u32::try_from(v).map_err(|_| {
            field(key, format!("{v} does not fit 32 bits (the ioctl's field is a u32)"))
        })
    }

    fn hex(&self, key: &'static str) -> Result<u64, ParseErrorKind> {
        parse_hex(&self.string(key)?).map_err(|p| field(key, p))
    }
}

/// serde_json's message with the position as a column of the trace line (serde_json counts the
/// line as its line 1, which next to the trace's own line number reads as a contradiction), and
/// a hint for a byte-order mark, which JSON does not allow.
fn json_error(e: &serde_json::Error, text: &str) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    if text.starts_with('\u{feff}') {
        return format!("{what} at column 1: the line starts with a byte-order mark (U+FEFF); save the trace as UTF-8 without one");
    }
    if e.line() == 0 {
        return what.to_string();
    }
    format!("{what} at column {}", e.column())
}

/// Parses `0x` + lowercase hex without leading zeros.
pub fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("0x").ok_or_else(|| format!("{s:?} must start with 0x"))?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("{s:?} is not lowercase hex (0x followed by 0-9a-f)"));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(format!("{s:?} has leading zeros"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| format!("{s:?} does not fit 64 bits"))
}

/// Parses `t`: digits, a dot, exactly six digits; returns microseconds.
fn parse_t(raw: &str) -> Result<u64, ParseErrorKind> {
    let bad = || field("t", format!("{raw} must be seconds with exactly six decimals (0.000000)"));
    if raw.starts_with('-') {
        return Err(field("t", format!("{raw} is negative: seconds since the first event")));
    }
    let (int, frac) = raw.split_once('.').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || frac.len() != 6 || !digits(frac) {
        return Err(bad());
    }
    let too_big =
        || field("t", format!("{raw} is too large: at most {} seconds", u64::MAX / 1_000_000));
    let (i, f): (u64, u64) =
        (int.parse().map_err(|_| too_big())?, frac.parse().map_err(|_| bad())?);
    i.checked_mul(1_000_000).and_then(|us| us.checked_add(f)).ok_or_else(too_big)
}

const SLOT_KEYS: [&str; 8] = ["t", "op", "as", "id", "flags", "gpa", "size", "uaddr"];
const MMIO_KEYS: [&str; 7] = ["t", "op", "dir", "gpa", "len", "value", "exit"];
const GET_KEYS: [&str; 4] = ["t", "op", "as", "id"];
const CLEAR_KEYS: [&str; 6] = ["t", "op", "as", "id", "first_page", "num_pages"];
const KVM_KEYS: [&str; 3] = ["t", "op", "event"];

fn parse_flags(o: &Ordered<'_>) -> Result<(bool, bool), ParseErrorKind> {
    let flags: Vec<String> = serde_json::from_str(o.raw("flags")?)
        .map_err(|_| field("flags", "must be a list of strings"))?;
    let order = ["dirty_log", "readonly"];
    let mut next = 0;
    let (mut dirty, mut ro) = (false, false);
    for f in &flags {
        let Some(i) = order.iter().position(|o| o == f) else {
            return Err(field("flags", format!("unknown flag {f:?} (dirty_log, readonly)")));
        };
        if i < next {
            return Err(field(
                "flags",
                "flags must be in the order dirty_log, readonly, once each",
            ));
        }
        next = i + 1;
        if i == 0 {
            dirty = true;
        } else {
            ro = true;
        }
    }
    Ok((dirty, ro))
}

fn parse_event(o: &Ordered<'_>, op: &str) -> Result<EventKind, ParseErrorKind> {
    Ok(match op {
        "slot" => {
            o.expect_keys("slot event", &SLOT_KEYS)?;
            let (dirty_log, readonly) = parse_flags(o)?;
            EventKind::Slot(SlotEvent {
                as_id: o.u16("as")?,
                id: o.u16("id")?,
                dirty_log,
                readonly,
                gpa: o.hex("gpa")?,
                size: o.hex("size")?,
                uaddr: o.hex("uaddr")?,
            })
        }
        "mmio" => {
            o.expect_keys("mmio event", &MMIO_KEYS)?;
            let dir = match o.string("dir")?.as_str() {
                "read" => Dir::Read,
                "write" => Dir::Write,
                d => return Err(field("dir", format!("{d:?} is neither \"read\" nor \"write\""))),
            };
            let gpa = o.hex("gpa")?;
            let len = o.int("len")?;
            if !(1..=MAX_MMIO_LEN).contains(&len) {
                return Err(field(
                    "len",
                    format!("{len} is not a length KVM traces (1 to {MAX_MMIO_LEN} bytes)"),
                ));
            }
            if (gpa & 0xfff) + len > 0x1000 {
                return Err(ParseErrorKind::CrossesPage { gpa, len });
            }
            if gpa >> GUEST_PHYS_BITS != 0 {
                return Err(field(
                    "gpa",
                    format!(
                        "{gpa:#x} is at or above 2^{GUEST_PHYS_BITS}: no x86 guest can access \
                         it (MAXPHYADDR is at most {GUEST_PHYS_BITS})"
                    ),
                ));
            }
            let exit = match o.string("exit")?.as_str() {
                "user" => Exit::User,
                "kernel" => Exit::Kernel,
                e => {
                    return Err(field("exit", format!("{e:?} is neither \"user\" nor \"kernel\"")))
                }
            };
            let value = match o.raw("value")? {
                // Only a read that exited to the VMM can be left without a value (the VMM
                // stopped before completing it); the kernel completes its own reads.
                "null" if dir == Dir::Read && exit == Exit::User => None,
                "null" if dir == Dir::Read => {
                    return Err(field(
                        "value",
                        "null is allowed only for a read with \"exit\":\"user\" (one the VMM \
                         never completed); a read the kernel served has its value",
                    ))
                }
                "null" => return Err(field("value", "null is allowed for reads only")),
                raw => {
                    // Lowercase hex without leading zeros: more than 16 digits is more than 8
                    // bytes, which no recording holds, whatever `len` says.
                    let digits = raw
                        .trim_matches('"')
                        .strip_prefix("0x")
                        .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
                        .map_or(0, str::len);
                    if digits > 16 && len > 8 {
                        return Err(field(
                            "value",
                            format!(
                                "{raw} has more than 8 bytes: a trace carries at most the first 8 \
                                 bytes of an access, even of a {len}-byte one (KVM's kvm_mmio \
                                 tracepoint keeps 8)"
                            ),
                        ));
                    }
                    let v = o.hex("value")?;
                    if len < 8 && v >> (8 * len) != 0 {
                        return Err(field("value", format!("{v:#x} has more than {len} bytes")));
                    }
                    Some(v)
                }
            };
            EventKind::Mmio(MmioEvent { dir, gpa, len, value, exit })
        }
        "get-dirty-log" => {
            o.expect_keys("get-dirty-log event", &GET_KEYS)?;
            EventKind::GetDirtyLog { as_id: o.u16("as")?, id: o.u16("id")? }
        }
        "clear-dirty-log" => {
            o.expect_keys("clear-dirty-log event", &CLEAR_KEYS)?;
            EventKind::ClearDirtyLog {
                as_id: o.u16("as")?,
                id: o.u16("id")?,
                first_page: o.int("first_page")?,
                num_pages: o.u32("num_pages")?,
            }
        }
        "kvm" => {
            o.expect_keys("kvm event", &KVM_KEYS)?;
            match o.string("event")?.as_str() {
                "zap_all_fast" => EventKind::KvmZapAllFast,
                e => {
                    return Err(field(
                        "event",
                        format!("unknown kvm event {e:?} (v1: zap_all_fast)"),
                    ))
                }
            }
        }
        other => return Err(ParseErrorKind::UnknownOp(other.to_string())),
    })
}

/// A summary value that must be an object of non-negative integer counts, each name once.
fn counts(o: &Ordered<'_>, key: &'static str) -> Result<BTreeMap<String, u64>, ParseErrorKind> {
    let bad = || field(key, "must be an object of non-negative integer counts ({\"name\":N,...})");
    let pairs: Ordered<'_> = serde_json::from_str(o.raw(key)?).map_err(|_| bad())?;
    let mut counts = BTreeMap::new();
    for (name, raw) in pairs.0 {
        let n: u64 = serde_json::from_str(raw.get()).map_err(|_| bad())?;
        if counts.insert(name.clone(), n).is_some() {
            return Err(field(key, format!("counts {name:?} twice")));
        }
    }
    Ok(counts)
}

/// Checks the summary line and the parts a replayer uses. Keys: `op` first, each at most once;
/// those the contract's table names (any subset: a hand-written trace may give only `events`)
/// each of the type the table gives; others unchecked. `events` counts match the file, and count
/// every kind the file has lines of (a kind v1 does not have may be counted only as 0).
fn parse_summary(o: &Ordered<'_>, events: &[Event]) -> Result<Summary, ParseErrorKind> {
    let keys = o.keys();
    let bad_keys = |problem: String| ParseErrorKind::SummaryKeys { problem, found: keys.join(",") };
    if keys.first() != Some(&"op") {
        return Err(bad_keys("\"op\" is not first".into()));
    }
    // A key the table does not name is kept out of the checks, not refused: the summary is not
    // an event (the "no others" rule is for event lines), it only describes the capture, and a
    // later kit may count more there without a new `vmmu_trace` version.
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].contains(k) {
            return Err(bad_keys(format!("{k:?} is given twice")));
        }
    }
    let present = |key: &str| keys.contains(&key);
    let get = |key: &'static str| -> Result<Option<u64>, ParseErrorKind> {
        if present(key) {
            o.int(key).map(Some)
        } else {
            Ok(None)
        }
    };
    if present("span") {
        let raw = o.raw("span")?;
        let ok = raw.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && serde_json::from_str::<f64>(raw).is_ok();
        if !ok {
            return Err(field(
                "span",
                format!("must be non-negative seconds (14.371771), not {raw}"),
            ));
        }
    }
    for key in ["pio_exits", "pio_accesses"] {
        get(key)?;
    }
    let mut userspace_exits = BTreeMap::new();
    for key in ["userspace_exits", "kvm_counted", "other_events", "anomalies"] {
        if present(key) {
            let c = counts(o, key)?;
            if key == "userspace_exits" {
                userspace_exits = c;
            }
        }
    }
    if present("pio") {
        let per_port: Result<BTreeMap<String, BTreeMap<String, u64>>, _> =
            serde_json::from_str(o.raw("pio")?);
        if per_port.is_err() {
            return Err(field(
                "pio",
                "must be an object of ports, each an object of counts ({\"0x70\":{\"read\":N,\"write\":N},...})",
            ));
        }
    }
    if present("events") {
        let given = counts(o, "events")?;
        let lines_of = |op: EventOp| events.iter().filter(|e| e.kind.op() == op).count() as u64;
        for op in EventOp::ALL {
            let have = lines_of(op);
            if have > 0 && !given.contains_key(op.as_str()) {
                return Err(ParseErrorKind::CountMissing { op, have });
            }
        }
        for (name, want) in given {
            let Some(op) = EventOp::from_name(&name) else {
                if want == 0 {
                    continue;
                }
                let kinds: Vec<&str> = EventOp::ALL.iter().map(|o| o.as_str()).collect();
                return Err(field(
                    "events",
                    format!("counts kind {name:?}, which v1 does not have ({})", kinds.join(", ")),
                ));
            };
            let have = lines_of(op);
            if have != want {
                return Err(ParseErrorKind::CountMismatch { op, want, have });
            }
        }
    }
    Ok(Summary {
        kernel_mmio_dropped: get("kernel_mmio_dropped")?,
        lost_events: get("lost_events")?,
        vcpu_threads: get("vcpu_threads")?,
        userspace_exits,
    })
}

/// Parses a whole trace.
pub fn parse(text: &str) -> Result<Trace, ParseError> {
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l)).peekable();
    // A final "\n" leaves one empty piece at the end: not a line.
    let at = |line: usize| move |kind: ParseErrorKind| ParseError { line, kind };
    let (_, header) = lines.next().ok_or(ParseError { line: 1, kind: ParseErrorKind::Empty })?;
    if header.trim().is_empty() {
        return Err(at(1)(ParseErrorKind::Empty));
    }
    let h = Ordered::parse(header).map_err(at(1))?;
    // The version first: a later version's header may carry other keys. The key-order rule is
    // the event lines' (traces.md), so the header's two keys may come in either order.
    let version = h.raw("vmmu_trace").map_err(at(1))?;
    if version != "1" {
        return Err(at(1)(ParseErrorKind::Version(version.to_string())));
    }
    let mut keys = h.keys();
    keys.sort_unstable();
    if keys != ["source", "vmmu_trace"] {
        return Err(at(1)(ParseErrorKind::HeaderKeys(h.keys().join(","))));
    }
    let source = h.string("source").map_err(at(1))?;
    let mut events: Vec<Event> = Vec::new();
    let mut summary = None;
    let mut prev_t: Option<(u64, String)> = None;
    while let Some((n, line)) = lines.next() {
        if line.is_empty() && lines.peek().is_none() {
            break;
        }
        let err = at(n);
        if summary.is_some() {
            return Err(err(ParseErrorKind::AfterSummary));
        }
        if line.trim().is_empty() {
            return Err(err(ParseErrorKind::Blank));
        }
        let o = Ordered::parse(line).map_err(err)?;
        let op = o.0.iter().find(|(k, _)| k == "op").map(|(_, v)| v.get());
        let op: String = match op {
            Some(raw) => {
                serde_json::from_str(raw).map_err(|_| err(field("op", "must be a JSON string")))?
            }
            None => return Err(err(field("op", "missing"))),
        };
        if op == "summary" {
            summary = Some(parse_summary(&o, &events).map_err(err)?);
            continue;
        }
        // The event's own checks come first: they check the key order, `t` included.
        let kind = parse_event(&o, &op).map_err(err)?;
        let raw_t = o.raw("t").map_err(err)?;
        let t_us = parse_t(raw_t).map_err(err)?;
        match &prev_t {
            None if t_us != 0 => return Err(err(ParseErrorKind::FirstTime(raw_t.to_string()))),
            Some((p, praw)) if t_us < *p => {
                return Err(err(ParseErrorKind::TimeBackwards {
                    t: raw_t.to_string(),
                    previous: praw.clone(),
                }))
            }
            _ => {}
        }
        prev_t = Some((t_us, raw_t.to_string()));
        events.push(Event { line: n, t_us, kind });
    }
    Ok(Trace { source, events, summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "{\"vmmu_trace\":1,\"source\":\"test\"}\n";

    fn one(line: &str) -> Result<Trace, ParseError> {
        parse(&format!("{H}{line}\n"))
    }

    fn kind_at(text: &str) -> (usize, String) {
        let e = parse(text).expect_err("must fail");
        (e.line, e.kind.to_string())
    }

    #[test]
    fn parses_every_kind() {
        let t = parse(concat!(
            "{\"vmmu_trace\":1,\"source\":\"s\"}\n",
            "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[\"dirty_log\",\"readonly\"],\"gpa\":\"0xfffc0000\",\"size\":\"0x40000\",\"uaddr\":\"0x7f0000000000\"}\n",
            "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfee000f0\",\"len\":4,\"value\":\"0xff\",\"exit\":\"kernel\"}\n",
            "{\"t\":0.000001,\"op\":\"get-dirty-log\",\"as\":0,\"id\":3}\n",
            "{\"t\":1.500000,\"op\":\"clear-dirty-log\",\"as\":0,\"id\":3,\"first_page\":0,\"num_pages\":4096}\n",
            "{\"t\":1.500000,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}\n",
            "{\"op\":\"summary\",\"span\":1.5,\"events\":{\"slot\":1,\"mmio\":1,\"get-dirty-log\":1,\"clear-dirty-log\":1,\"kvm\":1},\"kernel_mmio_dropped\":7,\"lost_events\":0,\"vcpu_threads\":1}\n",
        ))
        .expect("valid");
        assert_eq!(t.source, "s");
        assert_eq!(t.events.len(), 5);
        assert_eq!(
            t.events[0].kind,
            EventKind::Slot(SlotEvent {
                as_id: 0,
                id: 1,
                dirty_log: true,
                readonly: true,
                gpa: 0xfffc_0000,
                size: 0x40000,
                uaddr: 0x7f00_0000_0000
            })
        );
        assert_eq!(t.events[3].t_us, 1_500_000);
        assert_eq!(t.events[4].line, 6);
        assert_eq!(t.summary.as_ref().and_then(|s| s.kernel_mmio_dropped), Some(7));
    }

    #[test]
    fn header_rules() {
        assert_eq!(kind_at("").0, 1);
        assert!(kind_at("{\"vmmu_trace\":2,\"source\":\"x\"}\n").1.contains("version 1"));
        let v2 = "{\"vmmu_trace\":2,\"source\":\"x\",\"host\":\"y\"}\n";
        assert!(kind_at(v2).1.contains("version 1"), "a version error, not a key error");
        assert!(kind_at("{\"vmmu_trace\":1,\"source\":\"x\",\"host\":1}\n").1.contains("keys"));
        let missing = kind_at("{\"vmmu_trace\":1}\n").1;
        assert!(missing.contains("vmmu_trace and source") && missing.contains("either order"));
        assert!(!missing.contains("in that order"), "{missing}");
        let reversed =
            parse("{\"source\":\"x\",\"vmmu_trace\":1}\n").expect("header keys in any order");
        assert_eq!(reversed.source, "x");
    }

    #[test]
    fn event_rules_name_the_line() {
        let slot = "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x1000\",\"uaddr\":\"0x1000\"}";
        assert!(one(slot).is_ok());
        let cases = [
            (slot.replace("\"as\":0,\"id\":0", "\"id\":0,\"as\":0"), "keys"),
            (slot.replace("\"0x1000\",\"uaddr", "\"0x01000\",\"uaddr"), "leading zeros"),
            (slot.replace("\"0x1000\",\"uaddr", "\"0x1A00\",\"uaddr"), "lowercase"),
            (slot.replace("0.000000", "0.0"), "six decimals"),
            (slot.replace("0.000000", "-1.000000"), "negative"),
            (slot.replace("0.000000", "99999999999999999999.000000"), "too large"),
            (slot.replace("0.000000", "0.000001"), "first event"),
            (slot.replace("\"slot\"", "\"teleport\""), "unknown op"),
            (slot.replace("[]", "[\"readonly\",\"dirty_log\"]"), "order"),
            (slot.replace("\"id\":0", "\"id\":-1"), "integer"),
            (slot.replace('}', ",\"extra\":1}"), "keys"),
        ];
        for (line, want) in cases {
            let e = one(&line).expect_err(&line);
            assert_eq!(e.line, 2, "{line}");
            assert!(e.kind.to_string().contains(want), "{line}: {e}");
        }
        let text = format!("{H}{slot}\n\n{slot}\n");
        assert_eq!(kind_at(&text).0, 3);
        let back = slot.replace("0.000000", "0.000002");
        let text = format!("{H}{slot}\n{back}\n{slot}\n");
        assert!(kind_at(&text).1.contains("time order"));
    }

    #[test]
    fn mmio_rules() {
        let m = "{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xb8000\",\"len\":2,\"value\":\"0x741\",\"exit\":\"kernel\"}";
        assert!(one(m).is_ok());
        assert!(one(&m.replace("0xb8000", "0xffffffffff000")).is_ok(), "the last page below 2^52");
        for (line, want) in [
            (m.replace("\"len\":2", "\"len\":0"), "1 to 32 bytes"),
            (m.replace("\"len\":2", "\"len\":33"), "1 to 32 bytes"),
            (m.replace("0xb8000", "0xb8fff"), "crosses"),
            (m.replace("\"0x741\"", "null"), "reads only"),
            (m.replace("0x741", "0x10000"), "more than 2 bytes"),
            (m.replace("kernel", "hypervisor"), "exit"),
            (m.replace("0xb8000", "0x10000000000000"), "no x86 guest can access"),
        ] {
            let e = one(&line).expect_err(&line);
            assert!(e.kind.to_string().contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn mmio_lengths_as_kvm_traces_them() {
        // Recorded with the kit: a 4-byte store at 0xb8fff (KVM splits it at the page: 1 + 3
        // bytes) and a 16-byte `movdqu` store (one event; the tracepoint keeps 8 bytes of value).
        let at = |gpa: &str, len: u64, value: &str| {
            format!("{{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"{gpa}\",\"len\":{len},\"value\":\"{value}\",\"exit\":\"kernel\"}}")
        };
        for (gpa, len, value) in
            [("0xb8fff", 1, "0x44"), ("0xb9000", 3, "0x414243"), ("0xb8100", 16, "0x0")]
        {
            let t = one(&at(gpa, len, value)).unwrap_or_else(|e| panic!("{gpa} {len}: {e}"));
            let EventKind::Mmio(m) = t.events[0].kind else { panic!("not mmio") };
            assert_eq!(m.len, len);
        }
        for len in [5, 6, 7, 10, 32] {
            assert!(one(&at("0xfebf0000", len, "0x1")).is_ok(), "{len}");
        }
        assert!(one(&at("0xb8ff8", 16, "0x0"))
            .expect_err("crosses")
            .kind
            .to_string()
            .contains("crosses"));
        assert!(one(&at("0xb9000", 3, "0x1000000"))
            .expect_err("value")
            .kind
            .to_string()
            .contains("more than 3 bytes"));
        // A value of all 32 bytes of a 32-byte access: the trace keeps 8 at most, and says so
        // (not that the number does not fit 64 bits).
        let wide = format!("0x1{}", "0".repeat(63));
        let e = one(&at("0xfebf0000", 32, &wide)).expect_err("wide").kind.to_string();
        assert!(e.contains("at most the first 8 bytes of an access, even of a 32-byte one"), "{e}");
    }

    #[test]
    fn summary_must_be_last_and_match() {
        let k = "{\"t\":0.000000,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}";
        let s = "{\"op\":\"summary\",\"events\":{\"kvm\":2}}";
        let e = parse(&format!("{H}{k}\n{s}\n")).expect_err("count");
        assert_eq!(e.line, 3);
        assert!(e.kind.to_string().contains("truncated"));
        let s1 = "{\"op\":\"summary\",\"events\":{\"kvm\":1}}";
        assert!(parse(&format!("{H}{k}\n{s1}\n")).is_ok());
        assert_eq!(parse(&format!("{H}{k}\n{s1}\n{k}\n")).expect_err("after").line, 4);
    }

    #[test]
    fn a_null_value_is_a_read_the_vmm_never_completed() {
        let m = |exit: &str| {
            format!("{{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfebf0000\",\"len\":1,\"value\":null,\"exit\":\"{exit}\"}}")
        };
        let t = one(&m("user")).expect("an uncompleted user read");
        assert!(matches!(t.events[0].kind, EventKind::Mmio(MmioEvent { value: None, .. })));
        // The kernel completes the reads it serves: a null value there is not what the kit writes.
        let e = one(&m("kernel")).expect_err("kernel read without a value");
        assert_eq!(e.line, 2);
        assert!(e.kind.to_string().contains("\"exit\":\"user\""), "{e}");
    }

    #[test]
    fn num_pages_is_the_ioctls_u32() {
        let c = |n: u64| {
            format!("{{\"t\":0.000000,\"op\":\"clear-dirty-log\",\"as\":0,\"id\":3,\"first_page\":0,\"num_pages\":{n}}}")
        };
        let t = one(&c(u64::from(u32::MAX))).expect("u32::MAX pages");
        assert!(matches!(t.events[0].kind, EventKind::ClearDirtyLog { num_pages: u32::MAX, .. }));
        let e = one(&c(1 << 32)).expect_err("2^32 pages");
        assert_eq!(e.line, 2);
        assert!(e.kind.to_string().contains("does not fit 32 bits"), "{e}");
    }

    #[test]
    fn summary_keys_and_types_are_checked() {
        let k = "{\"t\":0.000000,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}";
        let full = "{\"op\":\"summary\",\"span\":14.371771,\"events\":{\"slot\":0,\"mmio\":0,\"get-dirty-log\":0,\"clear-dirty-log\":0,\"kvm\":1},\
            \"kernel_mmio_dropped\":0,\"lost_events\":0,\"vcpu_threads\":1,\"userspace_exits\":{\"KVM_EXIT_IO\":9079,\"restart\":2},\
            \"pio_exits\":9079,\"pio_accesses\":9197,\"pio\":{\"0x70\":{\"read\":352,\"write\":29}},\"kvm_counted\":{},\"other_events\":{},\"anomalies\":{}}";
        assert!(parse(&format!("{H}{k}\n{full}\n")).is_ok());
        // Keys the table does not name, and a zero count of a kind v1 does not have, are
        // accepted: the summary describes the capture and is not an event line.
        for summary in [
            "{\"op\":\"summary\",\"host_cpus\":2,\"events\":{\"kvm\":1}}",
            "{\"op\":\"summary\",\"events\":{\"kvm\":1,\"frob\":0}}",
        ] {
            assert!(parse(&format!("{H}{k}\n{summary}\n")).is_ok(), "{summary}");
        }
        for (summary, want) in [
            ("{\"events\":{\"kvm\":1},\"op\":\"summary\"}", "\"op\" is not first"),
            ("{\"op\":\"summary\",\"op\":\"summary\"}", "given twice"),
            ("{\"op\":\"summary\",\"lost_events\":0,\"lost_events\":3}", "given twice"),
            ("{\"op\":\"summary\",\"span\":\"14\"}", "non-negative seconds"),
            ("{\"op\":\"summary\",\"span\":-1.0}", "non-negative seconds"),
            ("{\"op\":\"summary\",\"events\":{\"kvm\":1,\"frob\":2}}", "\"frob\""),
            ("{\"op\":\"summary\",\"events\":[1]}", "counts"),
            ("{\"op\":\"summary\",\"pio_exits\":1.5}", "integer"),
            ("{\"op\":\"summary\",\"anomalies\":[]}", "counts"),
            ("{\"op\":\"summary\",\"userspace_exits\":{\"KVM_EXIT_IO\":-1}}", "counts"),
            ("{\"op\":\"summary\",\"pio\":{\"0x70\":3}}", "ports"),
            ("{\"op\":\"summary\",\"events\":{\"kvm\":1,\"kvm\":1}}", "counts \"kvm\" twice"),
            // A kind the file has lines of, left out of `events`: truncation goes unseen.
            ("{\"op\":\"summary\",\"events\":{}}", "no count of kvm events, and the file has 1"),
            ("{\"op\":\"summary\",\"events\":{\"slot\":0}}", "no count of kvm events"),
        ] {
            let e = parse(&format!("{H}{k}\n{summary}\n")).expect_err(summary);
            assert_eq!(e.line, 3, "{summary}");
            assert!(e.kind.to_string().contains(want), "{summary}: {e}");
        }
    }

    #[test]
    fn json_errors_name_a_column_of_the_trace_line() {
        let e = parse(&format!("{H}{{\"t\":0.000000,\"op\":\"kvm\",\"event\":zap}}\n"))
            .expect_err("bad JSON");
        assert_eq!(e.line, 2);
        let msg = e.kind.to_string();
        assert!(msg.ends_with("at column 34"), "{msg}");
        assert!(!msg.contains("line 1"), "{msg}");
        let e = parse("\u{feff}{\"vmmu_trace\":1,\"source\":\"x\"}\n").expect_err("BOM");
        assert_eq!(e.line, 1);
        assert!(e.kind.to_string().contains("byte-order mark"), "{}", e.kind);
    }

    /// Kills `parse_flags`'s `i < next` -> `>`: a slot with `readonly` alone (every ROM slot of
    /// the reference recordings) would be refused as out of order, and a flag given twice would
    /// be accepted against the contract's "in that order" list of distinct flags.
    #[test]
    fn slot_flags_one_each_in_contract_order() {
        let slot = |flags: &str| {
            format!("{{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[{flags}],\"gpa\":\"0xfffc0000\",\"size\":\"0x40000\",\"uaddr\":\"0x7f0000000000\"}}")
        };
        for (flags, dirty, ro) in [
            ("", false, false),
            ("\"dirty_log\"", true, false),
            ("\"readonly\"", false, true),
            ("\"dirty_log\",\"readonly\"", true, true),
        ] {
            let t = one(&slot(flags)).unwrap_or_else(|e| panic!("[{flags}]: {e}"));
            let EventKind::Slot(s) = t.events[0].kind else { panic!("not a slot") };
            assert_eq!((s.dirty_log, s.readonly), (dirty, ro), "[{flags}]");
        }
        for flags in [
            "\"dirty_log\",\"dirty_log\"",
            "\"readonly\",\"readonly\"",
            "\"readonly\",\"dirty_log\"",
        ] {
            let e = one(&slot(flags)).expect_err(flags);
            assert_eq!(e.line, 2, "[{flags}]");
            assert!(
                e.kind.to_string().contains("in the order dirty_log, readonly, once each"),
                "[{flags}]: {e}"
            );
        }
    }

    /// Kills `Trace::count` -> 0, -> 1 and its `==` -> `!=`: the KVM replay asks it whether a
    /// trace has `clear-dirty-log` calls (to enable manual dirty-log protection) and how many
    /// `mmio` events it will check; a wrong count enables the wrong mode or misreports progress.
    #[test]
    fn count_gives_the_events_of_one_kind() {
        let k = "{\"t\":0.000000,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}";
        let g = "{\"t\":0.000000,\"op\":\"get-dirty-log\",\"as\":0,\"id\":3}";
        let t = parse(&format!("{H}{k}\n{g}\n{k}\n")).expect("valid");
        assert_eq!(t.count(EventOp::Kvm), 2);
        assert_eq!(t.count(EventOp::GetDirtyLog), 1);
        assert_eq!(t.count(EventOp::ClearDirtyLog), 0);
    }

    /// Kills the `expecting` -> `Ok(Default::default())` mutant of the key-order visitor: a line
    /// that is JSON but not an object (an array, a number) would be refused with a message that
    /// says what it found but not what a trace line must be.
    #[test]
    fn a_line_that_is_not_an_object_says_an_object_was_expected() {
        for line in ["[1,2]", "7"] {
            let e = one(line).expect_err(line);
            assert_eq!(e.line, 2, "{line}");
            let msg = e.kind.to_string();
            assert!(msg.starts_with("not a JSON object: invalid type: "), "{line}: {msg}");
            assert!(msg.contains(", expected a JSON object"), "{line}: {msg}");
        }
    }

    #[test]
    fn hex_format() {
        assert_eq!(parse_hex("0x0"), Ok(0));
        assert_eq!(parse_hex("0xffffffffffffffff"), Ok(u64::MAX));
        assert!(parse_hex("0x").is_err());
        assert!(parse_hex("0x00").is_err());
        assert!(parse_hex("0x10000000000000000").is_err());
        assert!(parse_hex("10").is_err());
    }
}
