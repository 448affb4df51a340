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
    let addr = if s.vm.paging == crate::step::Paging::Off { "gpa" } else { "gva" };
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
                // Version 1 files print as before; paging is named only when on.
                if vm.paging != crate::step::Paging::Off {
                    let _ = write!(t, " paging={}", vm.paging);
                }
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
                writeln!(t, "read {} {addr}={:#x} size={}", r.vcpu, r.gpa, r.width.bytes())
            }
            Op::Write(w) => writeln!(
                t,
                "write {} {addr}={:#x} size={} value={:#x}",
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
            Op::Map(m) => {
                let _ = write!(
                    t,
                    "map space={} gva={:#x} gpa={:#x} size={}",
                    m.space,
                    m.gva,
                    m.gpa,
                    page_size(m.size)
                );
                let flags: Vec<&str> = [
                    (m.flags.readonly, "readonly"),
                    (m.flags.supervisor, "supervisor"),
                    (m.flags.reserved, "reserved"),
                ]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
                if !flags.is_empty() {
                    let _ = write!(t, " flags={}", flags.join(","));
                }
                writeln!(t)
            }
            Op::Unmap(u) => {
                writeln!(t, "unmap space={} gva={:#x} size={}", u.space, u.gva, page_size(u.size))
            }
            Op::Cr3(c) => writeln!(t, "cr3 {} space={}", c.vcpu, c.space),
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

fn page_size(s: crate::step::PageSize) -> &'static str {
    match s {
        crate::step::PageSize::Size4K => "4K",
        crate::step::PageSize::Size2M => "2M",
    }
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
    fn canonical_form_of_a_paging_file() {
        let s = parse(
            "vm paging=4level format=shadow vcpus=2\nmem b size=8K\n\
             slot 1 gpa=0x10000000 size=8K mem=b\n\
             map gva=0x40000000 gpa=0x10000000 size=4096 flags=supervisor,readonly\n\
             map space=2 gva=0xffffffffffe00000 gpa=0x200000000 size=2M flags=reserved\n\
             cr3 1 space=2\nread 1 gva=0xffffffffffe00010 size=8\n\
             write 0 gva=0x40000ff8 size=8 value=0x1\nunmap gva=0x40000000\n",
        )
        .unwrap();
        let printed = to_text(&s);
        assert_eq!(
            printed,
            "vm vcpus=2 address_spaces=1 mmio_caching=on format=shadow phys_bits=46 paging=4level\n\
             mem b size=0x2000\n\
             slot 1 as=0 gpa=0x10000000 size=0x2000 mem=b+0x0\n\
             map space=0 gva=0x40000000 gpa=0x10000000 size=4K flags=readonly,supervisor\n\
             map space=2 gva=0xffffffffffe00000 gpa=0x200000000 size=2M flags=reserved\n\
             cr3 1 space=2\n\
             read 1 gva=0xffffffffffe00010 size=8\n\
             write 0 gva=0x40000ff8 size=8 value=0x1\n\
             unmap space=0 gva=0x40000000 size=4K\n"
        );
        let again = parse(&printed).unwrap();
        assert!(same_steps(&s, &again));
        assert_eq!(to_text(&again), printed);
    }

    /// Version 2 files of the kinds the corpus will hold: each parses, round-trips, and prints
    /// to a fixed point.
    const V2_EXAMPLES: &[&str] = &[
        // A GVA mapped to MMIO, accessed, remapped to RAM, accessed (the 2011 case).
        "vm paging=4level format=shadow\nmem ram size=4K\nslot 1 gpa=0x10000000 size=4K mem=ram\n\
         map gva=0x40000000 gpa=0x20000000\nread 0 gva=0x40000000 size=4\n\
         map gva=0x40000000 gpa=0x10000000\nread 0 gva=0x40000000 size=4\n\
         write 0 gva=0x40000004 size=4 value=0xcafe\nhost-read ram+4 size=4\n",
        // Two spaces map one GVA differently; CR3 switches between them on two vCPUs.
        "vm vcpus=2 paging=4level\nmem a size=4K\nmem b size=4K\n\
         slot 1 gpa=0x10000000 size=4K mem=a\nslot 2 gpa=0x10001000 size=4K mem=b\n\
         map space=0 gva=0x40000000 gpa=0x10000000\nmap space=1 gva=0x40000000 gpa=0x10001000\n\
         write 0 gva=0x40000000 size=8 value=0x1111\ncr3 1 space=1\n\
         write 1 gva=0x40000000 size=8 value=0x2222\ncr3 0 space=1\nread 0 gva=0x40000000 size=8\n\
         cr3 0 space=0\nread 0 gva=0x40000000 size=8\n",
        // A 2 MiB guest page over a slot with an MMIO hole, then split into 4K pages.
        "vm paging=pae format=npt\nmem m size=1M\nslot 1 gpa=0x10000000 size=1M mem=m\n\
         map gva=0x80000000 gpa=0x10000000 size=2M\nread 0 gva=0x80000000 size=8\n\
         read 0 gva=0x80100000 size=8\nunmap gva=0x80000000 size=2M\n\
         map gva=0x80100000 gpa=0x10000000\nread 0 gva=0x80100000 size=8\n\
         read 0 gva=0x80000000 size=8\n",
        // Read-only, supervisor and reserved guest PTEs, and a read-only slot.
        "vm paging=4level format=ept mmio_caching=off\nmem m size=16K\n\
         slot 1 gpa=0x10000000 size=16K mem=m flags=readonly\n\
         map gva=0x7fffffff0000 gpa=0x10000000 flags=readonly\n\
         write 0 gva=0x7fffffff0000 size=1 value=1\n\
         map gva=0x7fffffff1000 gpa=0x10001000 flags=supervisor\nread 0 gva=0x7fffffff1000 size=1\n\
         map gva=0x7fffffff2000 gpa=0x10002000 flags=reserved\nread 0 gva=0x7fffffff2000 size=1\n\
         map gva=0x7fffffff3000 gpa=0x10003000\nwrite 0 gva=0x7fffffff3000 size=2 value=7\n\
         read 0 gva=0x7fffffff4000 size=1\n",
        // Slot churn under a mapped GVA.
        "vm paging=4level format=shadow\nmem m size=8K\n\
         map gva=0xffff808000000000 gpa=0x10000000\nread 0 gva=0xffff808000000000 size=4\n\
         slot 3 gpa=0x10000000 size=8K mem=m\nread 0 gva=0xffff808000000000 size=4\n\
         slot 3 gpa=0x10000000 size=0\nread 0 gva=0xffff808000000000 size=4\n",
    ];

    #[test]
    fn version_2_examples_round_trip() {
        for (i, text) in V2_EXAMPLES.iter().enumerate() {
            let a = parse(text).unwrap_or_else(|e| panic!("example {i}: {e}"));
            assert_ne!(a.vm.paging, crate::step::Paging::Off);
            let printed = to_text(&a);
            let b = parse(&printed).unwrap_or_else(|e| panic!("example {i}: {e}\n{printed}"));
            assert!(same_steps(&a, &b), "example {i}:\n{printed}");
            assert_eq!(to_text(&b), printed, "example {i}: printing is a fixed point");
        }
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
