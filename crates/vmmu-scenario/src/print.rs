//! A parsed [`Scenario`] back to scenario text, in one canonical form.
//!
//! [`to_text`] writes one line per step, every `vm` field explicit, numbers in lowercase hex
//! (decimal for ids, vCPUs and widths), buffer sizes as the whole pages they were rounded to,
//! and no comments. Parsing the result gives the same steps (same numbers, same meaning); the
//! line numbers are those of the printed file. Used to show a shrunk generated scenario or a
//! normalised corpus file.

use crate::step::{Op, Scenario};
use std::fmt::Write as _;

/// The scenario as canonical text (see the module docs).
pub fn to_text(s: &Scenario) -> String {
    let mut t = String::new();
    for step in &s.steps {
        // Writing to a String cannot fail.
        let _ = match &step.op {
            Op::Vm(vm) => {
                let _ = write!(
                    t,
                    "vm vcpus={} address_spaces={} mmio_caching={} format={} phys_bits={}",
                    vm.vcpus,
                    vm.address_spaces,
                    if vm.mmio_caching { "on" } else { "off" },
                    vm.format,
                    vm.phys_bits
                );
                // Version 2's field only when it is not the default, so a version-1 file prints
                // as version 1.
                if vm.dirty_log != crate::step::DirtyLogMode::Auto {
                    let _ = write!(t, " dirty_log={}", vm.dirty_log);
                }
                writeln!(t)
            }
            Op::Mem(_, decl) => writeln!(t, "mem {} size={:#x}", decl.name, decl.size),
            Op::Slot(op) => {
                let _ = write!(
                    t,
                    "slot {} as={} gpa={:#x} size={:#x}",
                    op.id, op.as_id, op.gpa, op.size
                );
                if let Some(m) = &op.mem {
                    let _ = write!(t, " mem={}+{:#x}", m.name, m.offset);
                }
                let flags: Vec<&str> =
                    [(op.flags.readonly, "readonly"), (op.flags.dirty_log, "dirty_log")]
                        .into_iter()
                        .filter_map(|(on, name)| on.then_some(name))
                        .collect();
                if !flags.is_empty() {
                    let _ = write!(t, " flags={}", flags.join(","));
                }
                writeln!(t)
            }
            Op::Read(r) => {
                writeln!(t, "read {} gpa={:#x} size={}", r.vcpu, r.gpa, r.width.bytes())
            }
            Op::Write(w) => writeln!(
                t,
                "write {} gpa={:#x} size={} value={:#x}",
                w.vcpu,
                w.gpa,
                w.width.bytes(),
                w.value
            ),
            Op::HostWrite(h) => writeln!(
                t,
                "host-write {}+{:#x} size={} value={:#x}",
                h.at.name,
                h.at.offset,
                h.width.bytes(),
                h.value
            ),
            Op::HostRead(h) => {
                writeln!(t, "host-read {}+{:#x} size={}", h.at.name, h.at.offset, h.width.bytes())
            }
            Op::MmioReply(v) => writeln!(t, "mmio-reply value={v:#x}"),
            Op::DirtyLog(d) => writeln!(t, "dirty-log {} as={}", d.id, d.as_id),
            Op::ClearDirtyLog(c) => writeln!(
                t,
                "clear-dirty-log {} as={} first={:#x} count={:#x}",
                c.id, c.as_id, c.first, c.count
            ),
        };
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use std::path::Path;

    /// Same steps, ignoring where they sat in the file.
    fn same_steps(a: &Scenario, b: &Scenario) -> bool {
        a.vm == b.vm
            && a.mems == b.mems
            && a.steps.len() == b.steps.len()
            && a.steps.iter().zip(&b.steps).all(|(x, y)| x.number == y.number && x.op == y.op)
    }

    #[test]
    fn canonical_form_of_a_small_file() {
        let s = parse(
            "# c\nvm vcpus=2\nmem b size=100\n\nslot 3 gpa=0x10000000 size=4K mem=b flags=dirty_log,readonly\n\
             slot 3 size=0 gpa=0x10000000\nread 1 gpa=0x10000000 size=2\nhost-write b size=1 value=7\nmmio-reply value=0\n",
        )
        .unwrap();
        assert_eq!(
            to_text(&s),
            "vm vcpus=2 address_spaces=1 mmio_caching=on format=ept phys_bits=46\n\
             mem b size=0x1000\n\
             slot 3 as=0 gpa=0x10000000 size=0x1000 mem=b+0x0 flags=readonly,dirty_log\n\
             slot 3 as=0 gpa=0x10000000 size=0x0\n\
             read 1 gpa=0x10000000 size=2\n\
             host-write b+0x0 size=1 value=0x7\n\
             mmio-reply value=0x0\n"
        );
    }

    #[test]
    fn dirty_log_steps_print_and_parse_back() {
        let src =
            "vm vcpus=1 dirty_log=manual\ndirty-log 2 as=1\nclear-dirty-log 2 first=64 count=65\n";
        let s = parse(src).unwrap();
        let text = to_text(&s);
        assert_eq!(
            text,
            "vm vcpus=1 address_spaces=1 mmio_caching=on format=ept phys_bits=46 dirty_log=manual\n\
             dirty-log 2 as=1\n\
             clear-dirty-log 2 as=0 first=0x40 count=0x41\n"
        );
        assert!(same_steps(&s, &parse(&text).unwrap()));
    }

    #[test]
    fn every_corpus_file_round_trips() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let a = parse(&text).unwrap();
            let printed = to_text(&a);
            let b = parse(&printed).unwrap_or_else(|e| panic!("{}: {e}\n{printed}", e.line));
            assert!(same_steps(&a, &b), "{}:\n{printed}", e.path().display());
            assert_eq!(to_text(&b), printed, "printing is a fixed point");
            n += 1;
        }
        assert!(n >= 25, "{n} corpus files");
    }
}
