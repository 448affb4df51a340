use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use vmmu_scenario::diff::{
    compare, machine_configurations, run_source, Configured, Verdict, VerdictLine,
};
use vmmu_scenario::generate::{paging_scenario, wide_paging_scenario};
use vmmu_scenario::{parse, Observation, Paging};

#[test]
fn pae_sim_formats_agree() {
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut runner = TestRunner::default();
    let strat =
        if std::env::var("WIDE").is_ok() { wide_paging_scenario() } else { paging_scenario() };
    let mut pae = 0;
    let mut bad = 0;
    for _ in 0..n {
        let g = strat.new_tree(&mut runner).unwrap().current();
        let text = g.text();
        let Ok(mut sc) = parse(&text) else { continue };
        if sc.vm.paging != Paging::Pae && std::env::var("ALL").is_err() {
            continue;
        }
        pae += 1;
        sc.vm.format = vmmu_scenario::Format::Shadow;
        let sources: Vec<_> = machine_configurations(None)
            .into_iter()
            .map(|(suffix, ov)| {
                let name = format!("sim-{suffix}");
                let b = Configured::new(&name, Box::new(vmmu_sim::SimBackend), ov);
                let mut s = run_source(&name, &b, &sc);
                // Dirty logs may differ between TDP and shadow with guest paging.
                if let vmmu_scenario::diff::Outcome::Stream(o) = &mut s.outcome {
                    for x in o.iter_mut() {
                        if let Observation::DirtyLog { result, .. } = x {
                            *result = vmmu_scenario::DirtyLogResult::Ok(vec![]);
                        }
                    }
                }
                s
            })
            .collect();
        let v = compare(&sources);
        if !matches!(v, Verdict::Equal { .. }) {
            bad += 1;
            println!("{}\n{}", VerdictLine { path: "gen", verdict: &v }, text);
            if bad > 3 {
                break;
            }
        }
    }
    println!("pae cases {pae}, bad {bad}");
    assert_eq!(bad, 0);
}
