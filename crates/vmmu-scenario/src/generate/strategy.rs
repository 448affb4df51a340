//! The proptest strategies that make recipes: the version 1 steps, guest paging, and the wide
//! flavors' large buffers and slots (the parent module's doc says what each draws).

use super::{
    Flavor, GenAs, GenChange, GenCount, GenFirst, GenGpa, GenGva, GenId, GenLogSlot, GenMap,
    GenMapGpa, GenOffset, GenPlace, GenScenario, GenSize, GenSlot, GenStep, GenTarget, GenVm,
    GenWidth, BIG_PAGES, BIG_REGIONS,
};
use crate::step::{DirtyLogMode, Format, Paging, PAGE_SIZE, SPACES};
use proptest::prelude::*;

fn gen_vm() -> impl Strategy<Value = GenVm> {
    (
        1u32..=4,
        prop_oneof![6 => Just(1u8), 1 => Just(2u8)],
        proptest::option::of(any::<bool>()),
        proptest::option::of(prop_oneof![Just(Format::Ept), Just(Format::Npt)]),
        proptest::option::of(prop_oneof![Just(46u8), Just(48u8), Just(52u8)]),
        proptest::option::of(prop_oneof![Just(DirtyLogMode::Auto), Just(DirtyLogMode::Manual)]),
    )
        .prop_map(|(vcpus, address_spaces, mmio_caching, format, phys_bits, dirty_log)| {
            GenVm {
                vcpus,
                address_spaces,
                mmio_caching,
                format,
                phys_bits,
                paging: None,
                dirty_log,
            }
        })
}

fn gen_vm_paging() -> impl Strategy<Value = GenVm> {
    (
        gen_vm(),
        prop_oneof![3 => Just(Paging::Level4), 1 => Just(Paging::Pae)],
        proptest::option::of(prop_oneof![
            1 => Just(Format::Ept),
            1 => Just(Format::Npt),
            2 => Just(Format::Shadow)
        ]),
    )
        .prop_map(|(vm, paging, format)| GenVm { paging: Some(paging), format, ..vm })
}

/// Spaces: mostly 0 and 1, sometimes any of the 8.
fn gen_space() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 0u8..2, 1 => 0u8..SPACES]
}

fn gen_gva() -> impl Strategy<Value = GenGva> {
    prop_oneof![
        6 => (0u64..4, 0u64..16).prop_map(|(r, p)| GenGva::Near(r, p)),
        1 => (0usize..5, 0u64..4).prop_map(|(e, p)| GenGva::Edge(e, p)),
    ]
}

fn gen_map_gpa() -> impl Strategy<Value = GenMapGpa> {
    prop_oneof![
        10 => (recent(), 0u64..16).prop_map(|(b, p)| GenMapGpa::Slot(b, p)),
        3 => (0u64..32).prop_map(GenMapGpa::Grid),
        3 => (0u64..8).prop_map(GenMapGpa::Hole),
        1 => Just(GenMapGpa::Top),
        1 => Just(GenMapGpa::Low),
    ]
}

fn gen_map() -> impl Strategy<Value = GenMap> {
    map_from(gen_space(), gen_gva(), gen_map_gpa(), [0.25, 0.15, 0.1, 0.08])
}

/// A `map` step in a space, at a gva, to a gpa from the given strategies, with its size and flags
/// drawn with the probabilities `[huge, readonly, supervisor, reserved]`.
fn map_from(
    space: impl Strategy<Value = u8>,
    gva: impl Strategy<Value = GenGva>,
    gpa: impl Strategy<Value = GenMapGpa>,
    [huge, readonly, supervisor, reserved]: [f64; 4],
) -> impl Strategy<Value = GenMap> {
    let w = proptest::bool::weighted;
    (space, gva, gpa, w(huge), w(readonly), w(supervisor), w(reserved)).prop_map(
        |(space, gva, gpa, huge, readonly, supervisor, reserved)| GenMap {
            space,
            gva,
            gpa,
            huge,
            readonly,
            supervisor,
            reserved,
        },
    )
}

fn gen_step_paging() -> impl Strategy<Value = GenStep> {
    prop_oneof![
        8 => gen_step(),
        6 => gen_map().prop_map(GenStep::Map),
        2 => (gen_space(), gen_gva(), proptest::bool::weighted(0.25))
            .prop_map(|(space, gva, huge)| GenStep::Unmap { space, gva, huge }),
        2 => (0u32..4, gen_space()).prop_map(|(vcpu, space)| GenStep::Cr3 { vcpu, space }),
        3 => (0u32..4, gen_target(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        3 => (0u32..4, gen_target(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
    ]
}

fn gen_id() -> impl Strategy<Value = GenId> {
    prop_oneof![
        28 => (0u16..32).prop_map(GenId::Small),
        1 => prop_oneof![Just(509u16), Just(32759u16)].prop_map(GenId::Edge),
        1 => prop_oneof![Just(32764u16), Just(32767u16), Just(u16::MAX)].prop_map(GenId::Bad),
    ]
}

fn gen_as() -> impl Strategy<Value = GenAs> {
    prop_oneof![
        38 => Just(GenAs::Zero),
        1 => Just(GenAs::One),
        1 => prop_oneof![Just(2u16), Just(u16::MAX)].prop_map(GenAs::Bad),
    ]
}

fn gen_gpa() -> impl Strategy<Value = GenGpa> {
    prop_oneof![
        24 => (0u64..32).prop_map(GenGpa::Grid),
        3 => (0u64..60).prop_map(GenGpa::Far),
        1 => Just(GenGpa::Top),
        1 => (0u64..32).prop_map(GenGpa::Misaligned),
        1 => Just(GenGpa::Wrap),
    ]
}

fn gen_size() -> impl Strategy<Value = GenSize> {
    prop_oneof![
        24 => (1u64..16).prop_map(GenSize::Pages),
        4 => Just(GenSize::Whole),
        1 => (0u64..16).prop_map(GenSize::Misaligned),
        1 => Just(GenSize::Zero),
        1 => Just(GenSize::Huge),
    ]
}

fn gen_offset() -> impl Strategy<Value = GenOffset> {
    prop_oneof![
        29 => (0u64..64).prop_map(GenOffset::Page),
        1 => (0u64..64).prop_map(GenOffset::Misaligned),
    ]
}

fn gen_width() -> impl Strategy<Value = GenWidth> {
    prop_oneof![Just(GenWidth(1)), Just(GenWidth(2)), Just(GenWidth(4)), Just(GenWidth(8))]
}

fn gen_slot() -> impl Strategy<Value = GenSlot> {
    // Read-only in one request of four, dirty logging in one of two.
    slot_from(gen_gpa(), gen_size(), gen_offset(), 2)
}

/// A slot request with any id, address space and buffer, its gpa, size and buffer offset from
/// the given strategies, and its flags from a draw `f` in `0..8`: read-only when
/// `f < readonly_below`, else dirty logging when `f < 6`.
fn slot_from(
    gpa: impl Strategy<Value = GenGpa>,
    size: impl Strategy<Value = GenSize>,
    offset: impl Strategy<Value = GenOffset>,
    readonly_below: u8,
) -> impl Strategy<Value = GenSlot> {
    (gen_id(), gen_as(), gpa, size, 0usize..3, offset, 0u8..8).prop_map(
        move |(id, as_id, gpa, size, mem, offset, f)| GenSlot {
            id,
            as_id,
            gpa,
            size,
            mem,
            offset,
            readonly: f < readonly_below,
            dirty_log: (readonly_below..6).contains(&f),
        },
    )
}

fn gen_change() -> impl Strategy<Value = GenChange> {
    prop_oneof![
        2 => Just(GenChange::Same),
        4 => gen_gpa().prop_map(GenChange::Move),
        3 => any::<(bool, bool)>()
            .prop_map(|(readonly, dirty_log)| GenChange::Flags { readonly, dirty_log }),
        4 => Just(GenChange::Delete),
        1 => gen_size().prop_map(GenChange::Resize),
        1 => gen_offset().prop_map(GenChange::Remap),
    ]
}

/// How far back a step looks for an earlier request: mostly the last two.
fn recent() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..2, 1 => 0usize..16]
}

fn gen_target() -> impl Strategy<Value = GenTarget> {
    let place = prop_oneof![
        3 => Just(GenPlace::First),
        3 => Just(GenPlace::Last),
        1 => Just(GenPlace::Before),
        1 => Just(GenPlace::After),
        3 => (0u64..4096).prop_map(GenPlace::Inside),
    ];
    prop_oneof![
        5 => (recent(), place).prop_map(|(i, p)| GenTarget::Slot(i, p)),
        1 => (0u64..32, 0u64..0x2_0000).prop_map(|(k, o)| GenTarget::Grid(k, o)),
    ]
}

fn gen_log_slot() -> impl Strategy<Value = GenLogSlot> {
    prop_oneof![
        6 => recent().prop_map(GenLogSlot::Recent),
        1 => (gen_id(), gen_as()).prop_map(|(id, a)| GenLogSlot::Id(id, a)),
    ]
}

fn gen_first() -> impl Strategy<Value = GenFirst> {
    // Mostly page 0: generated slots are small, so a later 64-page unit is past their end.
    prop_oneof![
        6 => Just(GenFirst::Aligned(0)),
        2 => (1u64..4).prop_map(GenFirst::Aligned),
        1 => (0u64..4).prop_map(GenFirst::Misaligned),
    ]
}

fn gen_count() -> impl Strategy<Value = GenCount> {
    prop_oneof![
        3 => (0u32..3).prop_map(GenCount::Words),
        3 => Just(GenCount::ToEnd),
        1 => (0u32..200).prop_map(GenCount::Pages),
    ]
}

fn gen_step() -> impl Strategy<Value = GenStep> {
    prop_oneof![
        2 => gen_log_slot().prop_map(GenStep::DirtyLog),
        2 => (gen_log_slot(), gen_first(), gen_count())
            .prop_map(|(s, f, c)| GenStep::ClearDirtyLog(s, f, c)),
        6 => gen_slot().prop_map(GenStep::Slot),
        4 => (recent(), gen_change()).prop_map(|(i, c)| GenStep::Reuse(i, c)),
        1 => (gen_id(), gen_as()).prop_map(|(id, a)| GenStep::Delete(id, a)),
        5 => (0u32..4, gen_target(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        4 => (0u32..4, gen_target(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
        1 => (0usize..3, 0u64..0x10_0000, gen_width(), any::<u64>())
            .prop_map(|(m, o, w, v)| GenStep::HostWrite(m, o, w, v)),
        1 => (0usize..3, 0u64..0x10_0000, gen_width())
            .prop_map(|(m, o, w)| GenStep::HostRead(m, o, w)),
        1 => any::<u64>().prop_map(GenStep::MmioReply),
    ]
}

/// Buffer sizes: odd sizes that round up, single pages, a few pages, 2 MiB.
fn gen_mem_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64),
        Just(0x1000),
        Just(0x1800),
        Just(0x4000),
        Just(0x1_0000),
        Just(0x20_0000),
    ]
}

/// Random scenarios of up to `max_steps` steps after the `vm` and `mem` lines.
pub fn scenario_with(max_steps: usize) -> impl Strategy<Value = GenScenario> {
    (gen_vm(), proptest::collection::vec(gen_mem_size(), 1..=3), {
        proptest::collection::vec(gen_step(), 0..=max_steps)
    })
        .prop_map(|(vm, mems, steps)| GenScenario { vm, mems, steps })
}

/// Random scenarios of up to 40 steps.
pub fn scenario() -> impl Strategy<Value = GenScenario> {
    scenario_with(40)
}

/// Random scenarios of `flavor` with up to `max_steps` steps after the `vm` and `mem` lines
/// ([`Flavor::V1`] is [`scenario_with`]).
pub fn scenario_for(flavor: Flavor, max_steps: usize) -> BoxedStrategy<GenScenario> {
    match flavor {
        Flavor::V1 => scenario_with(max_steps).boxed(),
        // The paging flavor opens with a slot request, so that maps made before any other slot
        // step have RAM to aim at (and reads through them reach RAM, not only MMIO), and a map
        // of one of its pages in space 0, where every vCPU starts, so that accesses made before
        // any other map step have a mapped page to aim at (not only page faults).
        Flavor::Paging => (
            gen_vm_paging(),
            proptest::collection::vec(gen_mem_size(), 1..=3),
            gen_slot(),
            map_from(
                Just(0),
                gen_gva(),
                (0u64..16).prop_map(|p| GenMapGpa::Slot(0, p)),
                [0.25, 0.1, 0.05, 0.03],
            ),
            proptest::collection::vec(gen_step_paging(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, map, steps)| GenScenario {
                vm,
                mems,
                steps: [GenStep::Slot(first), GenStep::Map(map)].into_iter().chain(steps).collect(),
            })
            .boxed(),
        // The wide flavors open with one or two large slot requests, so that most later steps
        // have one to aim at.
        Flavor::Wide => (
            gen_vm(),
            proptest::collection::vec(gen_mem_size_wide(), 1..=3),
            proptest::collection::vec(gen_slot_wide(), 1..=2),
            proptest::collection::vec(gen_step_wide(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, steps)| GenScenario {
                vm,
                mems,
                steps: first.into_iter().map(GenStep::Slot).chain(steps).collect(),
            })
            .boxed(),
        // Wide paging also maps a page of its first large slot in space 0 (as `Paging` does).
        Flavor::WidePaging => (
            gen_vm_paging(),
            proptest::collection::vec(gen_mem_size_wide(), 1..=3),
            proptest::collection::vec(gen_slot_wide(), 1..=2),
            map_from(
                Just(0),
                gen_gva_wide(),
                (0u64..BIG_PAGES).prop_map(|p| GenMapGpa::SlotPage(0, p)),
                [0.4, 0.1, 0.05, 0.03],
            ),
            proptest::collection::vec(gen_step_paging_wide(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, map, steps)| GenScenario {
                vm,
                mems,
                steps: first
                    .into_iter()
                    .map(GenStep::Slot)
                    .chain([GenStep::Map(map)])
                    .chain(steps)
                    .collect(),
            })
            .boxed(),
    }
}

/// Random [`Flavor::Wide`] scenarios (no guest paging, large slots), of up to 40 steps.
pub fn wide_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::Wide, 40)
}

/// Random [`Flavor::WidePaging`] scenarios (guest paging over large slots), of up to 40 steps.
pub fn wide_paging_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::WidePaging, 40)
}

/// Buffer sizes of the wide generators: 2 MiB and a page more or less, 4 and 6 MiB, and now and
/// then the small ones.
fn gen_mem_size_wide() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0x20_0000u64),
        2 => Just(0x20_1000),
        1 => Just(0x1f_f000),
        3 => Just(0x40_0000),
        1 => Just(0x60_0000),
        2 => gen_mem_size(),
    ]
}

/// A page within a 2 MiB region: its first, second, middle or last, or any.
fn gen_region_page() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(0u64), 1 => Just(1), 1 => Just(256), 1 => Just(511), 2 => 0u64..512]
}

fn gen_gpa_wide() -> impl Strategy<Value = GenGpa> {
    prop_oneof![
        4 => (0u64..BIG_REGIONS, gen_region_page()).prop_map(|(k, p)| GenGpa::Big(k, p)),
        1 => gen_gpa(),
    ]
}

fn gen_size_wide() -> impl Strategy<Value = GenSize> {
    prop_oneof![
        2 => Just(GenSize::Big(512)),
        1 => Just(GenSize::Big(511)),
        1 => Just(GenSize::Big(513)),
        1 => Just(GenSize::Big(1024)),
        3 => (1u64..BIG_PAGES).prop_map(GenSize::Big),
        2 => Just(GenSize::Whole),
        1 => gen_size(),
    ]
}

/// Buffer offsets: 0, 2 MiB, a page or a page short of 2 MiB (the host address then is not
/// 2 MiB-aligned with the gpa), any page, now and then misaligned.
fn gen_offset_wide() -> impl Strategy<Value = GenOffset> {
    prop_oneof![
        4 => Just(GenOffset::Page(0)),
        1 => Just(GenOffset::Page(512)),
        1 => Just(GenOffset::Page(1)),
        1 => Just(GenOffset::Page(511)),
        2 => (0u64..BIG_PAGES).prop_map(GenOffset::Page),
        1 => gen_offset(),
    ]
}

fn gen_slot_wide() -> impl Strategy<Value = GenSlot> {
    // Read-only in one request of eight, dirty logging in five.
    slot_from(gen_gpa_wide(), gen_size_wide(), gen_offset_wide(), 1)
}

fn gen_change_wide() -> impl Strategy<Value = GenChange> {
    prop_oneof![
        1 => Just(GenChange::Same),
        3 => gen_gpa_wide().prop_map(GenChange::Move),
        // Logging toggled on a live slot (read-only kept off: a toggle is refused).
        4 => any::<bool>().prop_map(|dirty_log| GenChange::Flags { readonly: false, dirty_log }),
        2 => Just(GenChange::Delete),
        1 => gen_size_wide().prop_map(GenChange::Resize),
        1 => gen_change(),
    ]
}

fn gen_place_wide() -> impl Strategy<Value = GenPlace> {
    prop_oneof![
        2 => Just(GenPlace::First),
        2 => Just(GenPlace::Last),
        1 => Just(GenPlace::Before),
        1 => Just(GenPlace::After),
        5 => (0u64..BIG_PAGES, 0u64..PAGE_SIZE).prop_map(|(p, o)| GenPlace::Page(p, o)),
        3 => (0u64..3, 0u64..32).prop_map(|(j, d)| GenPlace::Boundary(j, d)),
    ]
}

fn gen_target_wide() -> impl Strategy<Value = GenTarget> {
    prop_oneof![
        6 => (recent(), gen_place_wide()).prop_map(|(i, p)| GenTarget::Slot(i, p)),
        1 => gen_target(),
    ]
}

fn gen_first_wide() -> impl Strategy<Value = GenFirst> {
    prop_oneof![
        3 => Just(GenFirst::Aligned(0)),
        3 => (0u64..32).prop_map(GenFirst::Far),
        1 => gen_first(),
    ]
}

fn gen_count_wide() -> impl Strategy<Value = GenCount> {
    prop_oneof![
        3 => Just(GenCount::ToEnd),
        2 => (1u32..32).prop_map(GenCount::ManyWords),
        1 => gen_count(),
    ]
}

/// Boxed: nesting the composite step strategies unboxed overflows a debug build's stack when a
/// value tree is made.
fn gen_step_wide() -> BoxedStrategy<GenStep> {
    prop_oneof![
        6 => gen_step().boxed(),
        6 => gen_slot_wide().prop_map(GenStep::Slot),
        3 => (recent(), gen_change_wide()).prop_map(|(i, c)| GenStep::Reuse(i, c)),
        4 => (0u32..4, gen_target_wide(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        5 => (0u32..4, gen_target_wide(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
        5 => gen_log_slot().prop_map(GenStep::DirtyLog),
        3 => (gen_log_slot(), gen_first_wide(), gen_count_wide())
            .prop_map(|(s, f, c)| GenStep::ClearDirtyLog(s, f, c)),
        1 => (0usize..3, 0u64..0x60_0000, gen_width(), any::<u64>())
            .prop_map(|(m, o, w, v)| GenStep::HostWrite(m, o, w, v)),
    ]
    .boxed()
}

fn gen_gva_wide() -> impl Strategy<Value = GenGva> {
    prop_oneof![
        3 => (0u64..4, 0u64..512).prop_map(|(r, p)| GenGva::Wide(r, p)),
        2 => gen_gva(),
    ]
}

fn gen_map_wide() -> impl Strategy<Value = GenMap> {
    map_from(
        prop_oneof![1 => gen_space(), 1 => 0u8..SPACES],
        gen_gva_wide(),
        prop_oneof![
            6 => (recent(), 0u64..BIG_PAGES).prop_map(|(b, p)| GenMapGpa::SlotPage(b, p)),
            2 => gen_map_gpa(),
        ],
        [0.4, 0.15, 0.05, 0.03],
    )
}

fn gen_step_paging_wide() -> BoxedStrategy<GenStep> {
    prop_oneof![
        4 => gen_step_paging().boxed(),
        4 => gen_step_wide(),
        5 => gen_map_wide().prop_map(GenStep::Map),
        1 => (0u8..SPACES, gen_gva_wide(), proptest::bool::weighted(0.3))
            .prop_map(|(space, gva, huge)| GenStep::Unmap { space, gva, huge }),
        3 => (0u32..4, 0u8..SPACES).prop_map(|(vcpu, space)| GenStep::Cr3 { vcpu, space }),
        2 => gen_log_slot().prop_map(GenStep::DirtyLog),
        3 => (0u32..4, gen_target_wide(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        3 => (0u32..4, gen_target_wide(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
    ]
    .boxed()
}

/// Random version 2 scenarios with guest paging, of up to 40 steps.
pub fn paging_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::Paging, 40)
}
