//! Scenario text to [`Scenario`] (format versions 1 and 2, `shared/design/scenarios.md`).
//!
//! The parser is all-or-nothing: the first bad line stops it with a [`ParseError`] naming the
//! line and the column (both from 1; a column counts characters, a tab is one) of the word that
//! is wrong. What it rejects is the *line*, never the *request*: a `slot` line KVM would refuse
//! (misaligned, overlapping, too big) parses, and the backend reports KVM's errno.
//!
//! Words are separated by spaces and tabs only. A line may end in CRLF; any other control
//! character, a byte-order mark or a Unicode space outside a comment is an error at its column
//! ([`ParseErrorKind::BadCharacter`]), so that it never hides inside a word. Inside a comment anything goes.
//!
//! Version 2 guest paging (`paging=`, `map`, `unmap`, `cr3`, `gva=`) is in [`paging`].

use crate::step::{
    ClearDirtyLogOp, DirtyLogMode, DirtyLogOp, Format, HostReadOp, HostWriteOp, MemDecl, MemId,
    MemRef, Op, ReadOp, ReservedUse, Scenario, SlotFlags, SlotOp, Step, VmConfig, Width, WriteOp,
    ACCESS_LIMIT, PAGE_SIZE, RESERVED_BELOW, RESERVED_SLOT_IDS,
};
use std::collections::HashMap;

mod paging;

/// A scenario line that cannot be run, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {kind}")]
pub struct ParseError {
    /// Line, from 1.
    pub line: u32,
    /// Column (in characters), from 1.
    pub column: u32,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

/// What is wrong with a scenario line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The first word is not a step keyword.
    #[error("unknown step `{0}` (expected vm, mem, slot, read, write, host-write, host-read, mmio-reply, map, unmap, cr3, dirty-log or clear-dirty-log)")]
    UnknownStep(String),
    /// A `key=value` field this step does not have.
    #[error("`{step}` has no field `{field}` (its fields: {allowed})")]
    UnknownField {
        /// The step keyword.
        step: &'static str,
        /// The field written.
        field: String,
        /// The fields the step has.
        allowed: &'static str,
    },
    /// The same key twice on one line.
    #[error("field `{0}` is given twice")]
    RepeatedField(String),
    /// A required field is absent.
    #[error("`{step}` needs `{field}=`")]
    MissingField {
        /// The step keyword.
        step: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A required positional word is absent.
    #[error("`{step}` needs {what} after the keyword")]
    MissingArgument {
        /// The step keyword.
        step: &'static str,
        /// What is missing.
        what: &'static str,
    },
    /// A word where none (or a `key=value` field) was expected.
    #[error("unexpected word `{0}` (expected a key=value field)")]
    UnexpectedWord(String),
    /// Not a number in the scenario syntax.
    #[error("bad number `{text}`: {why}")]
    BadNumber {
        /// The text.
        text: String,
        /// Why.
        why: NumberProblem,
    },
    /// A number outside the range its field allows.
    #[error("{field}={value} is out of range (allowed: {allowed})")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value as written.
        value: String,
        /// The allowed range.
        allowed: &'static str,
    },
    /// A word that is not one of the allowed choices.
    #[error("{field}={value} is not allowed (expected {allowed})")]
    BadChoice {
        /// The field.
        field: &'static str,
        /// The value as written.
        value: String,
        /// The choices.
        allowed: &'static str,
    },
    /// A buffer name outside `[a-z][a-z0-9_]*`.
    #[error("bad buffer name `{0}` (names are [a-z][a-z0-9_]*)")]
    BadName(String),
    /// A buffer used before its `mem` line.
    #[error("no buffer `{0}` (declare it with an earlier `mem {0} size=...` line)")]
    UnknownMem(String),
    /// A second `mem` line with the same name.
    #[error("buffer `{0}` is already declared")]
    DuplicateMem(String),
    /// `vm` somewhere else than the first step, or twice.
    #[error("`vm` may appear only once, as the first step")]
    VmNotFirst,
    /// A slot of non-zero size without `mem=`.
    #[error(
        "a slot of non-zero size needs `mem=NAME[+OFFSET]` (only a delete, size=0, may omit it)"
    )]
    MemRequired,
    /// A flag twice in `flags=`.
    #[error("flag `{0}` is given twice")]
    RepeatedFlag(String),
    /// An access width other than 1, 2, 4, 8.
    #[error("size={0} is not an access width (expected 1, 2, 4 or 8)")]
    BadWidth(String),
    /// An access not aligned to its width.
    #[error("access at {addr:#x} is not aligned to its size {width}")]
    Misaligned {
        /// The address or offset.
        addr: u64,
        /// The width in bytes.
        width: u32,
    },
    /// A value that does not fit the access width.
    #[error("value {value:#x} does not fit in {width} byte(s)")]
    ValueTooWide {
        /// The value.
        value: u64,
        /// The width in bytes.
        width: u32,
    },
    /// A vCPU index not below `vcpus`.
    #[error("vCPU {vcpu} does not exist (the vm has {vcpus} vCPU(s), numbered from 0)")]
    NoSuchVcpu {
        /// The index written.
        vcpu: u64,
        /// The VM's vCPU count.
        vcpus: u32,
    },
    /// A guest access whose last byte lies at or above 64 GiB.
    #[error(
        "guest access at {gpa:#x} ends past 64 GiB (its last byte is at or above 0x1000000000): \
         the backends map guest memory below 64 GiB only"
    )]
    AccessTooHigh {
        /// The address.
        gpa: u64,
    },
    /// A `map`, `unmap` or `cr3` step in a VM without guest paging.
    #[error("`{step}` needs guest paging (`vm paging=4level` or `vm paging=pae`)")]
    NeedsPaging {
        /// The step keyword.
        step: &'static str,
    },
    /// An access that names `gpa=` with paging on, or `gva=` with paging off.
    #[error("with paging={paging} an access names `{expected}=`, not `{field}=`")]
    WrongAddressField {
        /// The field written.
        field: &'static str,
        /// The field the access needs.
        expected: &'static str,
        /// The VM's paging mode.
        paging: crate::step::Paging,
    },
    /// A GVA that is not canonical for the paging mode.
    #[error("{}", non_canonical(*gva, *paging))]
    NonCanonical {
        /// The address (of the access or page).
        gva: u64,
        /// The VM's paging mode.
        paging: crate::step::Paging,
    },
    /// A `map`/`unmap` address not aligned to the page size.
    #[error("{field}={addr:#x} is not aligned to the page size {}", page_size_name(*size))]
    PageMisaligned {
        /// `gva` or `gpa`.
        field: &'static str,
        /// The address.
        addr: u64,
        /// The page size.
        size: crate::step::PageSize,
    },
    /// A `map` whose guest-physical page's last byte lies at or above 64 GiB.
    #[error(
        "a {} page at gpa {gpa:#x} ends past 64 GiB (its last byte is at or above \
         0x1000000000): the backends map guest memory below 64 GiB only",
        page_size_name(*size)
    )]
    PageTooHigh {
        /// The page's gpa.
        gpa: u64,
        /// The page size.
        size: crate::step::PageSize,
    },
    /// A `map` whose page size mixes with what is live in its 2 MiB region of its page-table
    /// space.
    #[error(
        "map of a {} page at gva {gva:#x} in space {space}: the 2 MiB region holds live {} \
         mapping(s); page sizes may not mix in a region ({})",
        page_size_name(*size), page_size_name(*live), mixed_sizes_hint(*live, *gva)
    )]
    MixedPageSizes {
        /// The page-table space.
        space: u8,
        /// The page's gva.
        gva: u64,
        /// The size the line names.
        size: crate::step::PageSize,
        /// The size of what is live in the region.
        live: crate::step::PageSize,
    },
    /// A `map` that needs a guest page table when the file's maps hold the most there are.
    #[error(
        "this map needs a new guest page table, but the file's maps already hold {limit}, the most \
         the backends keep below 8 MiB (a 2M map or unmap frees the page table of its 2 MiB region if \
         no mapping in it is live)"
    )]
    TooManyTables {
        /// [`crate::MAP_TABLES`].
        limit: usize,
    },
    /// A host access that is not inside its buffer.
    #[error(
        "host access at {name}+{offset:#x} (size {width}) is outside the buffer ({size:#x} bytes)"
    )]
    OutsideBuffer {
        /// Buffer name.
        name: String,
        /// Offset.
        offset: u64,
        /// Width in bytes.
        width: u32,
        /// Buffer size (whole pages).
        size: u64,
    },
    /// Something reserved for the backends' own use.
    #[error("{0} is reserved for the backends' own use")]
    Reserved(String),
    /// A character outside a comment that is neither part of a word nor a space or a tab: a
    /// control character, a byte-order mark, or a space other than U+0020.
    #[error("character {} is not allowed outside a comment (words are separated by spaces or tabs)", char_name(*.0))]
    BadCharacter(char),
    /// A buffer size that is 0 or overflows when rounded up to pages.
    #[error("mem size={0} must be at least 1 and fit in 64 bits once rounded up to pages")]
    BadMemSize(String),
}

/// Why a word is not a number of the scenario syntax ([`ParseErrorKind::BadNumber`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NumberProblem {
    /// `0x` and nothing after it (or an empty `size=` body).
    #[error("no digits")]
    NoDigits,
    /// Digits with a `K`, `M` or `G` suffix in a field other than `size=`.
    #[error("a K, M or G suffix is allowed in `size=` only")]
    SuffixOutsideSize,
    /// A character after `0x` that is not a hex digit.
    #[error("expected only hex digits (0-9, a-f) after 0x")]
    BadHexDigits,
    /// A decimal number with a character that is not a digit (a sign, `_`, a letter).
    #[error("expected decimal digits or 0x hex (no signs, no `_`)")]
    BadDecimalDigits,
    /// Valid digits whose value (with its suffix, in `size=`) is past `u64`.
    #[error("does not fit in 64 bits")]
    TooBig,
    /// A `size=` value that is not a number with an optional `K`, `M` or `G` suffix.
    #[error("expected a number, optionally followed by K, M or G")]
    NotASize,
}

/// `U+XXXX` and, for the usual suspects, what it is.
fn char_name(c: char) -> String {
    let what = match c {
        '\r' => " (carriage return)",
        '\u{feff}' => " (byte-order mark: save the file as UTF-8 without one)",
        '\u{a0}' => " (no-break space)",
        '\u{b}' => " (vertical tab)",
        '\u{c}' => " (form feed)",
        '\0' => " (NUL)",
        _ => "",
    };
    format!("U+{:04X}{what}", u32::from(c))
}

fn page_size_name(s: crate::step::PageSize) -> &'static str {
    match s {
        crate::step::PageSize::Size4K => "4K",
        crate::step::PageSize::Size2M => "2M",
    }
}

/// The message of [`ParseErrorKind::NonCanonical`]: what the paging mode allows.
fn non_canonical(gva: u64, paging: crate::step::Paging) -> String {
    match paging {
        crate::step::Paging::Pae => {
            format!("gva {gva:#x} is outside paging=pae's 32-bit address space (below 4 GiB)")
        }
        _ => format!(
            "gva {gva:#x} is not canonical with paging={paging} (bits 63..47 must all be equal)"
        ),
    }
}

/// What to do instead of mixing page sizes in a 2 MiB region (`live`: the size mapped there).
fn mixed_sizes_hint(live: crate::step::PageSize, gva: u64) -> String {
    let region = gva & !(crate::step::PageSize::Size2M.bytes() - 1);
    match live {
        crate::step::PageSize::Size2M => format!("unmap gva={region:#x} size=2M first"),
        crate::step::PageSize::Size4K => {
            format!("unmap its 4K pages first, or all of them with unmap gva={region:#x} size=2M")
        }
    }
}

/// Parses a whole scenario. Nothing runs unless every line is good.
pub fn parse(text: &str) -> Result<Scenario, ParseError> {
    let mut p = Parser {
        vm: VmConfig::default(),
        mems: Vec::new(),
        by_name: HashMap::new(),
        pt: paging::Live::default(),
    };
    let mut steps = Vec::new();
    // Lines end at `\n` only: `split_words` drops the one `\r` of a CRLF end. (`str::lines`
    // would drop that `\r` too, and `split_words` a second one, hiding a stray CR.)
    for (i, raw) in text.split('\n').enumerate() {
        let line = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let words = split_words(raw).map_err(|(column, kind)| ParseError { line, column, kind })?;
        let Some(first) = words.first() else { continue };
        let number = u32::try_from(steps.len() + 1).unwrap_or(u32::MAX);
        let op = p.line(number, first, &words[1..]).map_err(|(column, kind)| ParseError {
            line,
            column,
            kind,
        })?;
        steps.push(Step { number, line, op });
    }
    Ok(Scenario { vm: p.vm, mems: p.mems, steps })
}

/// A word and its column (from 1).
#[derive(Clone, Copy, Debug)]
struct Word<'a> {
    text: &'a str,
    col: u32,
}

type LineResult<T> = Result<T, (u32, ParseErrorKind)>;

/// Splits a line into words, dropping a `#` comment and the `\r` of a CRLF line end. Words
/// are separated by spaces and tabs only; any other control character or space character (a
/// lone `\r`, a no-break space, a byte-order mark) outside the comment is an error at its column
/// rather than a part of a word that then shows as an invisible difference in a message.
fn split_words(raw: &str) -> LineResult<Vec<Word<'_>>> {
    let raw = raw.strip_suffix('\r').unwrap_or(raw);
    let line = raw.split('#').next().unwrap_or("");
    let mut words = Vec::new();
    let mut start: Option<(usize, u32)> = None;
    let mut col = 0u32;
    for (i, c) in line.char_indices() {
        col += 1;
        let blank = c == ' ' || c == '\t';
        if !blank && (c.is_control() || c.is_whitespace() || c == '\u{feff}') {
            return Err((col, ParseErrorKind::BadCharacter(c)));
        }
        match (blank, start) {
            (true, Some((s, sc))) => {
                words.push(Word { text: &line[s..i], col: sc });
                start = None;
            }
            (false, None) => start = Some((i, col)),
            _ => {}
        }
    }
    if let Some((s, sc)) = start {
        words.push(Word { text: &line[s..], col: sc });
    }
    Ok(words)
}

/// Parses `0x`-hex or decimal, no sign, no `_`.
fn number(w: Word<'_>) -> LineResult<u64> {
    let bad = |why| (w.col, ParseErrorKind::BadNumber { text: w.text.to_string(), why });
    let (digits, radix) = match w.text.strip_prefix("0x") {
        Some(h) => (h, 16),
        None => (w.text, 10),
    };
    if digits.is_empty() {
        return Err(bad(NumberProblem::NoDigits));
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        let body = digits.strip_suffix(['K', 'M', 'G']).unwrap_or("");
        return Err(bad(if !body.is_empty() && body.chars().all(|c| c.is_digit(radix)) {
            NumberProblem::SuffixOutsideSize
        } else if radix == 16 {
            NumberProblem::BadHexDigits
        } else {
            NumberProblem::BadDecimalDigits
        }));
    }
    u64::from_str_radix(digits, radix).map_err(|_| bad(NumberProblem::TooBig))
}

/// Parses a `size=` value: a number with an optional `K`, `M` or `G` suffix.
fn size(w: Word<'_>) -> LineResult<u64> {
    let (body, shift) = match w.text.as_bytes().last() {
        Some(b'K') => (&w.text[..w.text.len() - 1], 10),
        Some(b'M') => (&w.text[..w.text.len() - 1], 20),
        Some(b'G') => (&w.text[..w.text.len() - 1], 30),
        _ => (w.text, 0),
    };
    // Keep `number`'s reason when it is about the digits themselves (a value past `u64`, a bad
    // hex digit): "expected a number" would call `18446744073709551616` not a number.
    let n = number(Word { text: body, col: w.col }).map_err(|(c, e)| {
        let why = match e {
            ParseErrorKind::BadNumber { why: NumberProblem::TooBig, .. } => NumberProblem::TooBig,
            ParseErrorKind::BadNumber { why: NumberProblem::BadHexDigits, .. }
                if !body.ends_with(['K', 'M', 'G']) =>
            {
                NumberProblem::BadHexDigits
            }
            _ => NumberProblem::NotASize,
        };
        (c, ParseErrorKind::BadNumber { text: w.text.into(), why })
    })?;
    n.checked_mul(1u64 << shift).ok_or((
        w.col,
        ParseErrorKind::BadNumber { text: w.text.into(), why: NumberProblem::TooBig },
    ))
}

fn width(w: Word<'_>) -> LineResult<Width> {
    let n = size(w)?;
    Width::from_bytes(n).ok_or((w.col, ParseErrorKind::BadWidth(w.text.into())))
}

fn ranged<T: TryFrom<u64>>(
    w: Word<'_>,
    field: &'static str,
    lo: u64,
    hi: u64,
    allowed: &'static str,
) -> LineResult<T> {
    let n = number(w)?;
    let oor = || (w.col, ParseErrorKind::OutOfRange { field, value: w.text.into(), allowed });
    if n < lo || n > hi {
        return Err(oor());
    }
    T::try_from(n).map_err(|_| oor())
}

fn fits(value: u64, width: Width, col: u32) -> LineResult<()> {
    if value & !width.mask() != 0 {
        return Err((col, ParseErrorKind::ValueTooWide { value, width: width.bytes() }));
    }
    Ok(())
}

/// The `key=value` fields of one line, checked against the step's field list.
struct Fields<'a> {
    step: &'static str,
    keyword_col: u32,
    map: HashMap<&'a str, Word<'a>>,
}

impl<'a> Fields<'a> {
    fn new(
        step: &'static str,
        keyword_col: u32,
        words: &[Word<'a>],
        allowed: &'static [&'static str],
        allowed_text: &'static str,
    ) -> LineResult<Self> {
        let mut map = HashMap::new();
        for w in words {
            let Some((key, value)) = w.text.split_once('=') else {
                return Err((w.col, ParseErrorKind::UnexpectedWord(w.text.into())));
            };
            if !allowed.contains(&key) {
                return Err((
                    w.col,
                    ParseErrorKind::UnknownField { step, field: key.into(), allowed: allowed_text },
                ));
            }
            let vcol = w.col + u32::try_from(key.chars().count() + 1).unwrap_or(0);
            if map.insert(key, Word { text: value, col: vcol }).is_some() {
                return Err((w.col, ParseErrorKind::RepeatedField(key.into())));
            }
        }
        Ok(Fields { step, keyword_col, map })
    }

    fn get(&self, key: &str) -> Option<Word<'a>> {
        self.map.get(key).copied()
    }

    fn need(&self, key: &'static str) -> LineResult<Word<'a>> {
        self.get(key)
            .ok_or((self.keyword_col, ParseErrorKind::MissingField { step: self.step, field: key }))
    }
}

/// Splits the positional words from the fields: exactly `n` positional words first.
fn positional<'w, 'a>(
    step: &'static str,
    keyword: Word<'a>,
    words: &'w [Word<'a>],
    what: &'static str,
) -> LineResult<(Word<'a>, &'w [Word<'a>])> {
    match words.split_first() {
        Some((w, rest)) if !w.text.contains('=') => Ok((*w, rest)),
        _ => Err((keyword.col, ParseErrorKind::MissingArgument { step, what })),
    }
}

struct Parser {
    vm: VmConfig,
    mems: Vec<MemDecl>,
    by_name: HashMap<String, MemId>,
    /// Live guest mappings (version 2).
    pt: paging::Live,
}

impl Parser {
    fn line(&mut self, step_no: u32, kw: &Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        match kw.text {
            "vm" => self.vm_line(step_no, *kw, rest),
            "mem" => self.mem_line(*kw, rest),
            "slot" => self.slot_line(*kw, rest),
            "read" => self.read_line(*kw, rest),
            "write" => self.write_line(*kw, rest),
            "host-write" => {
                let (at, fields) = positional("host-write", *kw, rest, "NAME[+OFFSET]")?;
                let f =
                    Fields::new("host-write", kw.col, fields, &["size", "value"], "size, value")?;
                let width = width(f.need("size")?)?;
                let vw = f.need("value")?;
                let value = number(vw)?;
                fits(value, width, vw.col)?;
                let at = self.host_place(at, width)?;
                Ok(Op::HostWrite(HostWriteOp { at, width, value }))
            }
            "host-read" => {
                let (at, fields) = positional("host-read", *kw, rest, "NAME[+OFFSET]")?;
                let f = Fields::new("host-read", kw.col, fields, &["size"], "size")?;
                let width = width(f.need("size")?)?;
                let at = self.host_place(at, width)?;
                Ok(Op::HostRead(HostReadOp { at, width }))
            }
            "mmio-reply" => {
                let f = Fields::new("mmio-reply", kw.col, rest, &["value"], "value")?;
                Ok(Op::MmioReply(number(f.need("value")?)?))
            }
            "map" => self.map_line(*kw, rest),
            "unmap" => self.unmap_line(*kw, rest),
            "cr3" => self.cr3_line(*kw, rest),
            "dirty-log" => {
                let (idw, fields) = positional("dirty-log", *kw, rest, "a slot ID")?;
                let f = Fields::new("dirty-log", kw.col, fields, &["as"], "as")?;
                let (id, as_id) = log_slot(idw, &f)?;
                Ok(Op::DirtyLog(DirtyLogOp { id, as_id }))
            }
            "clear-dirty-log" => {
                let (idw, fields) = positional("clear-dirty-log", *kw, rest, "a slot ID")?;
                let f = Fields::new(
                    "clear-dirty-log",
                    kw.col,
                    fields,
                    &["as", "first", "count"],
                    "as, first, count",
                )?;
                let (id, as_id) = log_slot(idw, &f)?;
                let first = number(f.need("first")?)?;
                let count =
                    ranged(f.need("count")?, "count", 0, u32::MAX.into(), "0..=0xffffffff")?;
                Ok(Op::ClearDirtyLog(ClearDirtyLogOp { id, as_id, first, count }))
            }
            other => Err((kw.col, ParseErrorKind::UnknownStep(other.into()))),
        }
    }

    fn vm_line(&mut self, number: u32, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        if number != 1 {
            return Err((kw.col, ParseErrorKind::VmNotFirst));
        }
        const ALLOWED: &[&str] = &[
            "vcpus",
            "address_spaces",
            "mmio_caching",
            "format",
            "phys_bits",
            "paging",
            "dirty_log",
        ];
        let f = Fields::new(
            "vm",
            kw.col,
            rest,
            ALLOWED,
            "vcpus, address_spaces, mmio_caching, format, phys_bits, paging, dirty_log",
        )?;
        let mut vm = VmConfig::default();
        if let Some(w) = f.get("vcpus") {
            vm.vcpus = ranged(w, "vcpus", 1, 256, "1..=256")?;
        }
        if let Some(w) = f.get("address_spaces") {
            vm.address_spaces = ranged(w, "address_spaces", 1, 2, "1 or 2")?;
        }
        if let Some(w) = f.get("mmio_caching") {
            vm.mmio_caching = match w.text {
                "on" => true,
                "off" => false,
                _ => return Err(choice(w, "mmio_caching", "on or off")),
            };
        }
        if let Some(w) = f.get("format") {
            vm.format = match w.text {
                "ept" => Format::Ept,
                "npt" => Format::Npt,
                "shadow" => Format::Shadow,
                _ => return Err(choice(w, "format", "ept, npt or shadow")),
            };
        }
        if let Some(w) = f.get("phys_bits") {
            vm.phys_bits = ranged(w, "phys_bits", 36, 52, "36..=52")?;
        }
        if let Some(w) = f.get("paging") {
            vm.paging = paging::paging_choice(w)?;
        }
        if let Some(w) = f.get("dirty_log") {
            vm.dirty_log = match w.text {
                "auto" => DirtyLogMode::Auto,
                "manual" => DirtyLogMode::Manual,
                _ => return Err(choice(w, "dirty_log", "auto or manual")),
            };
        }
        self.vm = vm;
        Ok(Op::Vm(vm))
    }

    fn mem_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        let (name, fields) = positional("mem", kw, rest, "a buffer NAME")?;
        check_name(name)?;
        let f = Fields::new("mem", kw.col, fields, &["size"], "size")?;
        let sw = f.need("size")?;
        let bytes = size(sw)?;
        let rounded = bytes
            .checked_add(PAGE_SIZE - 1)
            .map(|b| b & !(PAGE_SIZE - 1))
            .filter(|_| bytes != 0)
            .ok_or((sw.col, ParseErrorKind::BadMemSize(sw.text.into())))?;
        if self.by_name.contains_key(name.text) {
            return Err((name.col, ParseErrorKind::DuplicateMem(name.text.into())));
        }
        let id = MemId(self.mems.len());
        let decl = MemDecl { name: name.text.into(), size: rounded };
        self.by_name.insert(name.text.into(), id);
        self.mems.push(decl.clone());
        Ok(Op::Mem(id, decl))
    }

    fn slot_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        let (idw, fields) = positional("slot", kw, rest, "a slot ID")?;
        let id: u16 = ranged(idw, "ID", 0, 0xffff, "0..=65535")?;
        let f = Fields::new(
            "slot",
            kw.col,
            fields,
            &["as", "gpa", "size", "mem", "flags"],
            "as, gpa, size, mem, flags",
        )?;
        let as_id: u16 = match f.get("as") {
            Some(w) => ranged(w, "as", 0, 0xffff, "0..=65535")?,
            None => 0,
        };
        let gw = f.need("gpa")?;
        let gpa = number(gw)?;
        let size = size(f.need("size")?)?;
        let mem = match f.get("mem") {
            Some(w) => Some(self.mem_ref(w)?),
            None if size == 0 => None,
            None => return Err((kw.col, ParseErrorKind::MemRequired)),
        };
        let mut flags = SlotFlags::default();
        if let Some(w) = f.get("flags") {
            let mut col = w.col;
            for flag in w.text.split(',') {
                let seen = match flag {
                    "readonly" => std::mem::replace(&mut flags.readonly, true),
                    "dirty_log" => std::mem::replace(&mut flags.dirty_log, true),
                    _ => {
                        let fw = Word { text: flag, col };
                        return Err(choice(fw, "flags", "readonly and/or dirty_log"));
                    }
                };
                if seen {
                    return Err((col, ParseErrorKind::RepeatedFlag(flag.into())));
                }
                col += u32::try_from(flag.chars().count() + 1).unwrap_or(0);
            }
        }
        let op = SlotOp { id, as_id, gpa, size, mem, flags };
        match op.reserved_use() {
            Some(r @ ReservedUse::SlotId(_)) => {
                Err((idw.col, ParseErrorKind::Reserved(r.to_string())))
            }
            Some(r @ ReservedUse::Below(_)) => {
                Err((gw.col, ParseErrorKind::Reserved(r.to_string())))
            }
            None => Ok(Op::Slot(op)),
        }
    }

    fn access(&self, kw: Word<'_>, rest: &[Word<'_>], write: bool) -> LineResult<Op> {
        let step = if write { "write" } else { "read" };
        let (vw, fields) = positional(step, kw, rest, "a VCPU index")?;
        let (allowed, text): (&'static [&'static str], _) = if write {
            (&["gpa", "gva", "size", "value"], "gpa or gva, size, value")
        } else {
            (&["gpa", "gva", "size"], "gpa or gva, size")
        };
        let f = Fields::new(step, kw.col, fields, allowed, text)?;
        let vcpu = self.vcpu(vw)?;
        let gw = self.access_addr(&f)?;
        let gpa = number(gw)?;
        let width = width(f.need("size")?)?;
        let w = u64::from(width.bytes());
        if gpa % w != 0 {
            return Err((gw.col, ParseErrorKind::Misaligned { addr: gpa, width: width.bytes() }));
        }
        if self.vm.paging != crate::step::Paging::Off {
            self.check_gva(gw, gpa, w)?;
        } else if gpa < RESERVED_BELOW {
            return Err((
                gw.col,
                ParseErrorKind::Reserved(format!("a guest access at {gpa:#x} (below 8 MiB)")),
            ));
        } else if gpa.checked_add(w).is_none_or(|end| end > ACCESS_LIMIT) {
            return Err((gw.col, ParseErrorKind::AccessTooHigh { gpa }));
        }
        if write {
            let vw = f.need("value")?;
            let value = number(vw)?;
            fits(value, width, vw.col)?;
            Ok(Op::Write(WriteOp { vcpu, gpa, width, value }))
        } else {
            Ok(Op::Read(ReadOp { vcpu, gpa, width }))
        }
    }

    /// A vCPU index below `vcpus`.
    fn vcpu(&self, vw: Word<'_>) -> LineResult<u32> {
        let vcpu = number(vw)?;
        if vcpu >= u64::from(self.vm.vcpus) {
            return Err((vw.col, ParseErrorKind::NoSuchVcpu { vcpu, vcpus: self.vm.vcpus }));
        }
        Ok(u32::try_from(vcpu).unwrap_or(u32::MAX))
    }

    fn read_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        self.access(kw, rest, false)
    }

    fn write_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        self.access(kw, rest, true)
    }

    /// `NAME[+OFFSET]` naming a declared buffer.
    fn mem_ref(&self, w: Word<'_>) -> LineResult<MemRef> {
        let (name, offset) = match w.text.split_once('+') {
            Some((n, o)) => {
                let ocol = w.col + u32::try_from(n.chars().count() + 1).unwrap_or(0);
                (n, number(Word { text: o, col: ocol })?)
            }
            None => (w.text, 0),
        };
        let nw = Word { text: name, col: w.col };
        check_name(nw)?;
        let mem =
            *self.by_name.get(name).ok_or((w.col, ParseErrorKind::UnknownMem(name.into())))?;
        Ok(MemRef { mem, name: name.into(), offset })
    }

    fn host_place(&self, w: Word<'_>, width: Width) -> LineResult<MemRef> {
        let at = self.mem_ref(w)?;
        let b = u64::from(width.bytes());
        if at.offset % b != 0 {
            return Err((
                w.col,
                ParseErrorKind::Misaligned { addr: at.offset, width: width.bytes() },
            ));
        }
        let size = self.mems[at.mem.0].size;
        if at.offset.checked_add(b).is_none_or(|end| end > size) {
            return Err((
                w.col,
                ParseErrorKind::OutsideBuffer {
                    name: at.name,
                    offset: at.offset,
                    width: width.bytes(),
                    size,
                },
            ));
        }
        Ok(at)
    }
}

/// The slot of a `dirty-log` / `clear-dirty-log` line: `ID` and `as=` (16-bit each); the
/// backends' own slot ids are rejected as for `slot`.
fn log_slot(idw: Word<'_>, f: &Fields<'_>) -> LineResult<(u16, u16)> {
    let id: u16 = ranged(idw, "ID", 0, 0xffff, "0..=65535")?;
    let as_id: u16 = match f.get("as") {
        Some(w) => ranged(w, "as", 0, 0xffff, "0..=65535")?,
        None => 0,
    };
    if as_id == 0 && RESERVED_SLOT_IDS.contains(&id) {
        return Err((idw.col, ParseErrorKind::Reserved(ReservedUse::SlotId(id).to_string())));
    }
    Ok((id, as_id))
}

fn choice(w: Word<'_>, field: &'static str, allowed: &'static str) -> (u32, ParseErrorKind) {
    (w.col, ParseErrorKind::BadChoice { field, value: w.text.into(), allowed })
}

fn check_name(w: Word<'_>) -> LineResult<()> {
    let mut chars = w.text.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err((w.col, ParseErrorKind::BadName(w.text.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (u32, u32, ParseErrorKind) {
        match parse(text) {
            Ok(s) => panic!("parsed: {s:?}"),
            Err(e) => (e.line, e.column, e.kind),
        }
    }

    const HEAD: &str = "vm vcpus=2\nmem buf size=8K\n";

    #[test]
    fn full_example_parses_with_step_numbers_and_lines() {
        let s = parse(
            "# a comment\n\
             vm vcpus=2 address_spaces=2 mmio_caching=off format=npt phys_bits=52\n\
             \n\
             mem buf size=0x10K   # 16 KiB\n\
             slot 3 as=1 gpa=0x100000000 size=64K mem=buf+0x1000 flags=readonly,dirty_log\n\
             slot 3 gpa=0x100000000 size=0\n\
             read 1 gpa=0x100000008 size=8\n\
             write 0\tgpa=0x100000002 size=2 value=0xbeef\n\
             host-write buf+4 size=4 value=4294967295\n\
             host-read buf size=1\n\
             mmio-reply value=0xffffffffffffffff\n",
        )
        .unwrap();
        assert_eq!(s.vm.vcpus, 2);
        assert_eq!(s.vm.address_spaces, 2);
        assert!(!s.vm.mmio_caching);
        assert_eq!(s.vm.format, Format::Npt);
        assert_eq!(s.vm.phys_bits, 52);
        assert_eq!(s.mems, vec![MemDecl { name: "buf".into(), size: 0x4000 }]);
        let nums: Vec<_> = s.steps.iter().map(|st| (st.number, st.line)).collect();
        assert_eq!(
            nums,
            vec![(1, 2), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8), (7, 9), (8, 10), (9, 11)]
        );
        match &s.steps[2].op {
            Op::Slot(sl) => {
                assert_eq!(sl.kvm_slot(), 0x1_0003);
                assert_eq!(sl.gpa, 0x1_0000_0000);
                assert_eq!(sl.size, 0x10000);
                assert_eq!(sl.mem.as_ref().map(|m| (m.mem, m.offset)), Some((MemId(0), 0x1000)));
                assert_eq!(sl.flags.bits(), 3);
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(&s.steps[3].op, Op::Slot(SlotOp { size: 0, mem: None, .. })));
        assert_eq!(
            s.steps[5].op,
            Op::Write(WriteOp { vcpu: 0, gpa: 0x1_0000_0002, width: Width::W2, value: 0xbeef })
        );
        assert_eq!(s.steps[8].op, Op::MmioReply(u64::MAX));
    }

    #[test]
    fn defaults_without_vm_line() {
        let s = parse("mem b size=1\n").unwrap();
        assert_eq!(s.vm, VmConfig::default());
        assert_eq!(s.mems[0].size, 4096, "rounded up to a page");
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(err("vm\nfrob x=1\n"), (2, 1, ParseErrorKind::UnknownStep("frob".into())));
        let (l, c, k) = err("  vm  vcpu=2\n");
        assert_eq!((l, c), (1, 7));
        assert!(matches!(k, ParseErrorKind::UnknownField { .. }));
        let (l, c, k) = err(&format!("{HEAD}read 0 gpa=0x1_000 size=4\n"));
        assert_eq!((l, c), (3, 12));
        assert!(matches!(k, ParseErrorKind::BadNumber { .. }));
        let (l, c, _) = err(&format!("{HEAD}read 0 gpa=0x10000000 gpa=0x10000000 size=4\n"));
        assert_eq!((l, c), (3, 23));
        let (l, c, k) = err(&format!("{HEAD}\n\nread 0 gpa=0x10000002 size=4\n"));
        assert_eq!((l, c, k), (5, 12, ParseErrorKind::Misaligned { addr: 0x1000_0002, width: 4 }));
    }

    #[test]
    fn numbers_follow_the_syntax() {
        for bad in ["-1", "+1", "1_0", "0X10", "0x", "0xg", "18446744073709551616", "1k", "K"] {
            let text = format!("{HEAD}mmio-reply value={bad}\n");
            let (l, c, k) = err(&text);
            assert_eq!((l, c), (3, 18), "{bad}");
            assert!(matches!(k, ParseErrorKind::BadNumber { .. }), "{bad}: {k:?}");
        }
        let s =
            parse("mem a size=0x10K\nmem b size=3M\nmem c size=1G\nmmio-reply value=0xABCdef\n")
                .unwrap();
        assert_eq!(s.mems.iter().map(|m| m.size).collect::<Vec<_>>(), [0x4000, 3 << 20, 1 << 30]);
        assert_eq!(s.steps[3].op, Op::MmioReply(0xabcdef));
        // value= takes no suffix; a size suffix that overflows is an error.
        assert!(parse("mmio-reply value=1K\n").is_err());
        assert!(parse("mem a size=0xffffffffffffffffK\n").is_err());
        assert!(parse("mem a size=0\n").is_err());
        assert!(parse("mem a size=0xffffffffffffffff\n").is_err());
    }

    #[test]
    fn vm_only_first_and_once() {
        assert_eq!(err("mem a size=1\nvm\n"), (2, 1, ParseErrorKind::VmNotFirst));
        assert_eq!(err("vm\nvm\n"), (2, 1, ParseErrorKind::VmNotFirst));
        for bad in ["vcpus=0", "vcpus=257", "address_spaces=3", "phys_bits=35", "phys_bits=53"] {
            assert!(matches!(err(&format!("vm {bad}\n")).2, ParseErrorKind::OutOfRange { .. }));
        }
        assert!(matches!(err("vm format=tdp\n").2, ParseErrorKind::BadChoice { .. }));
        assert!(matches!(err("vm mmio_caching=yes\n").2, ParseErrorKind::BadChoice { .. }));
    }

    #[test]
    fn mem_names_and_references() {
        assert!(matches!(err("mem Buf size=1\n").2, ParseErrorKind::BadName(_)));
        assert!(matches!(err("mem 1b size=1\n").2, ParseErrorKind::BadName(_)));
        assert!(matches!(
            err("mem a size=1\nmem a size=1\n"),
            (2, 5, ParseErrorKind::DuplicateMem(_))
        ));
        assert_eq!(
            err("slot 1 gpa=0x10000000 size=4K mem=nope\n"),
            (1, 35, ParseErrorKind::UnknownMem("nope".into()))
        );
        // mem may be omitted only for a delete
        assert_eq!(err("slot 1 gpa=0x10000000 size=4K\n"), (1, 1, ParseErrorKind::MemRequired));
        assert!(parse("slot 1 gpa=0x10000000 size=0\n").is_ok());
        // The slot's offset is not checked: KVM sees it as written.
        assert!(parse("mem a size=1\nslot 1 gpa=0x10000000 size=4K mem=a+0x123457\n").is_ok());
    }

    #[test]
    fn slot_fields() {
        assert!(matches!(
            err("slot 65536 gpa=0x10000000 size=0\n"),
            (1, 6, ParseErrorKind::OutOfRange { field: "ID", .. })
        ));
        assert!(matches!(
            err("slot 1 as=65536 gpa=0x10000000 size=0\n"),
            (1, 11, ParseErrorKind::OutOfRange { field: "as", .. })
        ));
        assert!(matches!(
            err("slot 1 gpa=0x10000000 size=0 flags=readonly,bogus\n"),
            (1, 45, ParseErrorKind::BadChoice { .. })
        ));
        assert!(matches!(
            err("slot 1 gpa=0x10000000 size=0 flags=readonly,readonly\n"),
            (1, 45, ParseErrorKind::RepeatedFlag(_))
        ));
        assert!(matches!(
            err("slot gpa=0x10000000 size=0\n"),
            (1, 1, ParseErrorKind::MissingArgument { .. })
        ));
        assert!(matches!(
            err("slot 1 size=0\n"),
            (1, 1, ParseErrorKind::MissingField { field: "gpa", .. })
        ));
        assert!(matches!(
            err("slot 1 2 gpa=0 size=0\n"),
            (1, 8, ParseErrorKind::UnexpectedWord(_))
        ));
        // Invalid requests parse: KVM decides them.
        let s =
            parse("mem a size=4K\nslot 65535 as=7 gpa=0x10000001 size=0x123 mem=a+1\n").unwrap();
        assert!(matches!(s.steps[1].op, Op::Slot(SlotOp { id: 65535, as_id: 7, .. })));
    }

    #[test]
    fn reserved_ranges_are_rejected() {
        for id in [32760, 32763] {
            let (l, c, k) = err(&format!("slot {id} gpa=0x10000000 size=0\n"));
            assert_eq!((l, c), (1, 6));
            assert!(matches!(k, ParseErrorKind::Reserved(_)));
        }
        // Outside AS 0, and just outside the range, the ids are the scenario's.
        assert!(parse("slot 32760 as=1 gpa=0x10000000 size=0\n").is_ok());
        assert!(
            parse("slot 32759 gpa=0x10000000 size=0\nslot 32764 gpa=0x10000000 size=0\n").is_ok()
        );
        let (l, c, k) = err("mem a size=4K\nslot 1 gpa=0x7ff000 size=4K mem=a\n");
        assert_eq!((l, c), (2, 12));
        assert!(matches!(k, ParseErrorKind::Reserved(_)));
        // Size 0 below 8 MiB, AS 1, at 8 MiB, and a wrapping range are all the scenario's.
        assert!(parse("slot 1 gpa=0 size=0\n").is_ok());
        assert!(parse("mem a size=4K\nslot 1 as=1 gpa=0 size=4K mem=a\n").is_ok());
        assert!(parse("mem a size=4K\nslot 1 gpa=0x800000 size=4K mem=a\n").is_ok());
        assert!(parse("mem a size=4K\nslot 1 gpa=0x1000 size=0xfffffffffffff000 mem=a\n").is_ok());
        let (_, _, k) = err(&format!("{HEAD}read 0 gpa=0x7ffff8 size=8\n"));
        assert!(matches!(k, ParseErrorKind::Reserved(_)));
        let (_, _, k) = err(&format!("{HEAD}write 0 gpa=0x1000000000 size=1 value=0\n"));
        assert_eq!(k, ParseErrorKind::AccessTooHigh { gpa: 0x10_0000_0000 });
        assert!(parse(&format!("{HEAD}read 0 gpa=0xffffffff8 size=8\n")).is_ok());
    }

    #[test]
    fn accesses_are_checked() {
        assert!(matches!(
            err(&format!("{HEAD}read 2 gpa=0x10000000 size=4\n")),
            (3, 6, ParseErrorKind::NoSuchVcpu { vcpu: 2, vcpus: 2 })
        ));
        assert!(matches!(
            err(&format!("{HEAD}read 0 gpa=0x10000000 size=3\n")),
            (3, 28, ParseErrorKind::BadWidth(_))
        ));
        assert!(matches!(
            err(&format!("{HEAD}write 0 gpa=0x10000000 size=1 value=0x100\n")),
            (3, 37, ParseErrorKind::ValueTooWide { value: 0x100, width: 1 })
        ));
        assert!(matches!(
            err(&format!("{HEAD}write 0 gpa=0x10000000 size=1\n")),
            (3, 1, ParseErrorKind::MissingField { field: "value", .. })
        ));
        assert!(matches!(
            err(&format!("{HEAD}read 0 gpa=0x10000000 size=4 value=1\n")),
            (3, 30, ParseErrorKind::UnknownField { .. })
        ));
        assert!(matches!(
            err(&format!("{HEAD}host-read buf+0x1ffc size=8\n")),
            (3, 11, ParseErrorKind::Misaligned { .. })
        ));
        assert!(matches!(
            err(&format!("{HEAD}host-read buf+0x2000 size=1\n")),
            (3, 11, ParseErrorKind::OutsideBuffer { .. })
        ));
        assert!(matches!(
            err(&format!("{HEAD}host-write buf+0x1ff8 size=8 value=0x1ffffffffffffffff\n")),
            (3, 36, ParseErrorKind::BadNumber { .. })
        ));
        assert!(parse(&format!("{HEAD}host-write buf+0x1ff8 size=8 value=0xffffffffffffffff\n"))
            .is_ok());
    }

    #[test]
    fn dirty_log_steps() {
        let s = parse(
            "vm dirty_log=manual\nmem b size=4K\ndirty-log 3\ndirty-log 4 as=1\n\
             clear-dirty-log 3 first=0x40 count=64\nclear-dirty-log 32760 as=1 first=1 count=0\n",
        )
        .unwrap();
        assert_eq!(s.vm.dirty_log, DirtyLogMode::Manual);
        assert_eq!(s.steps[2].op, Op::DirtyLog(DirtyLogOp { id: 3, as_id: 0 }));
        match &s.steps[3].op {
            Op::DirtyLog(d) => assert_eq!(d.kvm_slot(), 0x1_0004),
            other => panic!("{other:?}"),
        }
        let c = ClearDirtyLogOp { id: 3, as_id: 0, first: 0x40, count: 64 };
        assert_eq!(s.steps[4].op, Op::ClearDirtyLog(c));
        assert!(
            matches!(s.steps[5].op, Op::ClearDirtyLog(c) if c.first == 1 && c.kvm_slot() == 0x1_7ff8),
            "misaligned first and reserved ids outside address space 0 parse: KVM decides"
        );
        assert_eq!(parse("dirty-log 1\n").unwrap().vm.dirty_log, DirtyLogMode::Auto);

        let e = |t: &str| {
            let (l, c, k) = err(t);
            (l, c, k.to_string())
        };
        assert_eq!(e("vm dirty_log=on\n").1, 14);
        assert!(e("vm dirty_log=on\n").2.contains("auto or manual"));
        assert_eq!(
            e("dirty-log\n"),
            (1, 1, "`dirty-log` needs a slot ID after the keyword".into())
        );
        assert_eq!(e("dirty-log 70000\n").1, 11);
        assert_eq!(e("dirty-log 1 first=0\n").1, 13, "dirty-log has no first=");
        assert_eq!(e("dirty-log 32761\n").1, 11, "a backend's own slot id");
        assert_eq!(e("clear-dirty-log 1 first=0\n").2, "`clear-dirty-log` needs `count=`");
        assert_eq!(e("clear-dirty-log 1 count=1\n").2, "`clear-dirty-log` needs `first=`");
        assert_eq!(e("clear-dirty-log 1 first=0 count=0x100000000\n").1, 33);
        assert_eq!(e("clear-dirty-log 1 first=-1 count=1\n").1, 25);
        assert_eq!(e("dirty-log 1\ndirty-log 1 as=1 as=1\n").0, 2);
    }

    #[test]
    fn words_are_separated_by_spaces_and_tabs_only() {
        // A CRLF line end is a line end; a tab separates words.
        let s = parse("vm\tvcpus=2\r\nmem a size=1 # caf\u{e9}\u{a0}\r\u{feff}\r\n").unwrap();
        assert_eq!((s.vm.vcpus, s.mems.len()), (2, 1));
        assert!(parse("mem a size=1\r").is_ok(), "a CR before the end of the file");
        for (text, col, c) in [
            ("vm\rvcpus=2\n", 3, '\r'),
            ("vm\u{a0}vcpus=2\n", 3, '\u{a0}'),
            ("\u{feff}vm\n", 1, '\u{feff}'),
            ("mem a size=1\u{b}\n", 13, '\u{b}'),
            ("mem a\u{2003}size=1\n", 6, '\u{2003}'),
            ("mem a size=1\0\n", 13, '\0'),
        ] {
            assert_eq!(err(text), (1, col, ParseErrorKind::BadCharacter(c)), "{text:?}");
        }
        assert_eq!(
            ParseErrorKind::BadCharacter('\u{feff}').to_string(),
            "character U+FEFF (byte-order mark: save the file as UTF-8 without one) is not \
             allowed outside a comment (words are separated by spaces or tabs)"
        );
    }

    /// Kills `number`'s `radix == 16` -> `!=`: the messages would swap, telling a user who
    /// wrote `0xg` to use decimal digits and one who wrote `1_0` to use hex digits.
    #[test]
    fn bad_number_messages_say_which_digits_were_expected() {
        for (bad, why, problem) in [
            ("0xg", "expected only hex digits (0-9, a-f) after 0x", NumberProblem::BadHexDigits),
            ("0x12g", "expected only hex digits (0-9, a-f) after 0x", NumberProblem::BadHexDigits),
            (
                "0x1000K",
                "a K, M or G suffix is allowed in `size=` only",
                NumberProblem::SuffixOutsideSize,
            ),
            (
                "4096M",
                "a K, M or G suffix is allowed in `size=` only",
                NumberProblem::SuffixOutsideSize,
            ),
            (
                "1_0",
                "expected decimal digits or 0x hex (no signs, no `_`)",
                NumberProblem::BadDecimalDigits,
            ),
            (
                "-1",
                "expected decimal digits or 0x hex (no signs, no `_`)",
                NumberProblem::BadDecimalDigits,
            ),
        ] {
            let e = parse(&format!("mmio-reply value={bad}\n")).expect_err(bad);
            assert_eq!(e.to_string(), format!("line 1, column 18: bad number `{bad}`: {why}"));
            assert_eq!(e.kind, ParseErrorKind::BadNumber { text: bad.into(), why: problem });
        }
    }

    /// A `size=` value whose digits are fine but too many for 64 bits says so, in decimal as in
    /// hex, with or without a suffix; a bad hex digit is named as such. (The decimal form used
    /// to read "expected a number, optionally followed by K, M or G", as if it were no number.)
    #[test]
    fn a_size_past_u64_says_it_does_not_fit() {
        for (bad, why, problem) in [
            ("18446744073709551616", "does not fit in 64 bits", NumberProblem::TooBig),
            ("18446744073709551616K", "does not fit in 64 bits", NumberProblem::TooBig),
            ("0x10000000000000000", "does not fit in 64 bits", NumberProblem::TooBig),
            ("0xffffffffffffffffG", "does not fit in 64 bits", NumberProblem::TooBig),
            ("0x1g", "expected only hex digits (0-9, a-f) after 0x", NumberProblem::BadHexDigits),
            ("4k", "expected a number, optionally followed by K, M or G", NumberProblem::NotASize),
            ("4KK", "expected a number, optionally followed by K, M or G", NumberProblem::NotASize),
            (
                "0x4KK",
                "expected a number, optionally followed by K, M or G",
                NumberProblem::NotASize,
            ),
            (
                "0X1000",
                "expected a number, optionally followed by K, M or G",
                NumberProblem::NotASize,
            ),
        ] {
            let e = parse(&format!("mem a size={bad}\n")).expect_err(bad);
            assert_eq!(e.to_string(), format!("line 1, column 12: bad number `{bad}`: {why}"));
            assert_eq!(e.kind, ParseErrorKind::BadNumber { text: bad.into(), why: problem });
        }
    }

    /// Kills `mem_ref`'s four offset-column mutants (`w.col + ...` and `count() + 1`, each to
    /// `-` and `*`): a bad `+OFFSET` would be reported at a column inside the buffer name (or
    /// past the line's end) instead of at the offset the user has to fix.
    #[test]
    fn a_bad_offset_is_reported_at_its_column() {
        let (l, c, k) = err(&format!("{HEAD}host-read buf+0xg size=1\n"));
        assert_eq!((l, c), (3, 15));
        assert!(matches!(k, ParseErrorKind::BadNumber { ref text, .. } if text == "0xg"), "{k:?}");
        let (l, c, k) = err("mem abc size=4K\nslot 1 gpa=0x10000000 size=4K mem=abc+-1\n");
        assert_eq!((l, c), (2, 39));
        assert!(matches!(k, ParseErrorKind::BadNumber { ref text, .. } if text == "-1"), "{k:?}");
    }

    /// Kills the five "delete match arm" mutants of `char_name` ('\r', '\u{a0}', '\u{b}',
    /// '\u{c}', '\0'): without its arm, the message for an invisible character gives only its
    /// code point, and the user is not told which character of the line to remove.
    #[test]
    fn bad_character_messages_name_the_usual_suspects() {
        for (text, what) in [
            ("vm\rvcpus=2\n", "U+000D (carriage return)"),
            ("vm\u{a0}vcpus=2\n", "U+00A0 (no-break space)"),
            ("vm\u{b}vcpus=2\n", "U+000B (vertical tab)"),
            ("vm\u{c}vcpus=2\n", "U+000C (form feed)"),
            ("vm\0vcpus=2\n", "U+0000 (NUL)"),
            ("vm\u{1}vcpus=2\n", "U+0001"),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(
                e.to_string(),
                format!(
                    "line 1, column 3: character {what} is not allowed outside a comment \
                     (words are separated by spaces or tabs)"
                ),
                "{text:?}"
            );
        }
    }

    /// A line ends at LF or CRLF only: a CR before a CRLF is a character of the line, an error
    /// at its column ("words are separated by spaces or tabs"). The parser read the lines with
    /// `str::lines`, which drops a CRLF's CR, and `split_words` dropped a second one, so
    /// `mem a size=1\r\r\n` parsed as `mem a size=1`.
    #[test]
    fn a_stray_cr_before_a_crlf_is_an_error() {
        assert_eq!(err("mem a size=1\r\r\n"), (1, 13, ParseErrorKind::BadCharacter('\r')));
        assert_eq!(err("vm\r\nvm\r\r\n"), (2, 3, ParseErrorKind::BadCharacter('\r')));
        let s = parse("vm\r\n\r\nmem a size=1\r\n# c\r\r\nmem b size=1").unwrap();
        let lines: Vec<_> = s.steps.iter().map(|st| (st.number, st.line)).collect();
        assert_eq!(lines, [(1, 1), (2, 3), (3, 5)]);
    }

    #[test]
    fn error_message_is_actionable() {
        let e = parse("mem a size=1\nslot 1 gpa=0x10000000 size=4K mem=b\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2, column 35: no buffer `b` (declare it with an earlier `mem b size=...` line)"
        );
    }
}
