//! `vmmu run`'s options, parsed with clap (derive), and their translation into a
//! [`MachineConfig`].
//!
//! Bad values are refused at parse time with a message naming the flag, the value and the allowed
//! range (clap exits with status 2 for them, which is `vmmu`'s "bad arguments" status).
//! [`RunOptions::validate`] applies the same rules to options built in code.

use crate::host::HostConfig;
use crate::machine::MachineConfig;
use clap::{Args, ValueEnum};
use std::time::Duration;

/// The SPTE format the MMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Intel EPT.
    Ept,
    /// AMD NPT (x86 page-table entries).
    Npt,
}

impl Format {
    /// The name the CLI and the report use.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Ept => "ept",
            Format::Npt => "npt",
        }
    }
}

/// An on/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Options of `vmmu run`.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// vCPUs (1..=256).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub vcpus: u16,
    /// How long to run, in seconds (more than 0, at most 3600).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub seconds: f64,
    /// SPTE format.
    #[arg(long, value_enum, default_value_t = Format::Ept)]
    pub format: Format,
    /// Host MAXPHYADDR in bits (36..=52).
    #[arg(long = "phys-bits", default_value_t = 46, value_parser = clap::value_parser!(u8).range(36..=52))]
    pub phys_bits: u8,
    /// Cache MMIO in SPTEs (the MMU may still turn it off, and says why in the report).
    #[arg(long = "mmio-caching", value_enum, default_value_t = OnOff::On)]
    pub mmio_caching: OnOff,
    /// Run twice, with MMIO caching on and off, and compare.
    #[arg(long = "compare-caching", conflicts_with = "mmio_caching")]
    pub compare_caching: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seed of the vCPUs' access mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stress the MMU's racy paths: host invalidations (MMU-notifier ranges over live slots,
    /// poisoned while invalidated) between memslot updates; every vCPU hammering the same BAR
    /// and DIMM GPAs while their slots are created, moved and deleted; and, with 3 or more
    /// vCPUs, the last vCPU staying in guest mode on TLB hits until the MMU asks it to leave.
    #[arg(long = "stress-paths")]
    pub stress_paths: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            vcpus: 2,
            seconds: 5.0,
            format: Format::Ept,
            phys_bits: 46,
            mmio_caching: OnOff::On,
            compare_caching: false,
            json: false,
            seed: 1,
            stress_paths: false,
        }
    }
}

/// A run option with a value the machine cannot use.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    /// `--vcpus` out of range.
    #[error("--vcpus {0}: give 1 to 256 vCPUs")]
    Vcpus(u16),
    /// `--seconds` out of range.
    #[error("--seconds {0}: give a time above 0 and at most 3600 seconds")]
    Seconds(f64),
    /// `--phys-bits` out of range.
    #[error("--phys-bits {0}: x86 MAXPHYADDR must be 36 to 52")]
    PhysBits(u8),
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 3600.0 {
        Ok(v)
    } else {
        Err(format!("{s} is not above 0 and at most 3600"))
    }
}

impl RunOptions {
    /// Checks the ranges clap checks, for options built in code.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(1..=256).contains(&self.vcpus) {
            return Err(OptionsError::Vcpus(self.vcpus));
        }
        if parse_seconds(&self.seconds.to_string()).is_err() {
            return Err(OptionsError::Seconds(self.seconds));
        }
        if !(36..=52).contains(&self.phys_bits) {
            return Err(OptionsError::PhysBits(self.phys_bits));
        }
        Ok(())
    }

    /// The run time.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.clamp(0.0, 3600.0))
    }

    /// Whether MMIO caching is requested for a single run.
    pub fn caching_requested(&self) -> bool {
        self.mmio_caching == OnOff::On
    }

    /// The machine configuration for these options (validated first).
    pub fn machine_config(&self) -> Result<MachineConfig, OptionsError> {
        self.validate()?;
        Ok(MachineConfig {
            vcpus: usize::from(self.vcpus),
            seed: self.seed,
            duration: self.duration(),
            host: HostConfig::new(self.phys_bits),
            format: match self.format {
                Format::Ept => vmmu::spte::FormatKind::Ept,
                Format::Npt => vmmu::spte::FormatKind::Npt,
            },
            mmio_caching_requested: self.caching_requested(),
            stress_paths: self.stress_paths,
            ..MachineConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: RunOptions,
    }

    fn parse(args: &[&str]) -> Result<RunOptions, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmmu").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn defaults_match_the_issue() {
        let o = parse(&[]).expect("defaults");
        assert_eq!(o, RunOptions::default());
        let c = o.machine_config().expect("config");
        assert_eq!((c.vcpus, c.duration, c.host.phys_bits), (2, Duration::from_secs(5), 46));
    }

    #[test]
    fn every_flag_parses() {
        let o = parse(&[
            "--vcpus",
            "4",
            "--seconds",
            "0.5",
            "--format",
            "npt",
            "--phys-bits",
            "52",
            "--mmio-caching",
            "off",
            "--json",
            "--seed",
            "9",
            "--stress-paths",
        ])
        .expect("flags");
        assert!(o.stress_paths && o.machine_config().expect("config").stress_paths);
        assert_eq!((o.vcpus, o.seconds, o.format, o.phys_bits), (4, 0.5, Format::Npt, 52));
        assert_eq!((o.mmio_caching, o.json, o.seed), (OnOff::Off, true, 9));
        assert!(parse(&["--compare-caching"]).expect("compare").compare_caching);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (args, needle) in [
            (&["--phys-bits", "35"][..], "36..=52"),
            (&["--phys-bits", "53"][..], "36..=52"),
            (&["--vcpus", "0"][..], "1..=256"),
            (&["--seconds", "0"][..], "above 0"),
            (&["--seconds", "x"][..], "not a number"),
            (&["--format", "shadow"][..], "shadow"),
            (&["--compare-caching", "--mmio-caching", "off"][..], "cannot be used with"),
        ] {
            let e = parse(args).expect_err("must fail");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
        let o = RunOptions { vcpus: 0, ..RunOptions::default() };
        assert_eq!(o.validate(), Err(OptionsError::Vcpus(0)));
        let o = RunOptions { phys_bits: 60, ..RunOptions::default() };
        assert!(o.machine_config().is_err());
    }
}
