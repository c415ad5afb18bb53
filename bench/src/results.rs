//! The collected results: runs per (configuration, setup, workload,
//! backend), backends that were skipped, and facts about the machine.

use std::collections::BTreeMap;

use crate::backend::{Config, Kind};
use crate::stats::RunStats;
use crate::workload::{Setup, Workload};

/// One measured case, independent of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Case {
    pub config: Config,
    pub setup: Setup,
    pub workload: Workload,
}

impl Case {
    /// e.g. `raw, 2 queues, randread 4k QD32`.
    pub fn title(&self) -> String {
        format!(
            "{}, {}, {}",
            self.config.name(),
            self.setup.describe(),
            self.workload.name()
        )
    }
}

/// The runs of one backend for one case.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    pub runs: Vec<RunStats>,
    pub errors: Vec<String>,
    /// How the export's queues were threaded, e.g. "1 iothread".
    pub threads: String,
}

/// Run parameters and machine facts, for the reports.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub reps: usize,
    pub image_mib: u64,
    /// Size of the images sequential writes go through once.
    pub pass_mib: u64,
    pub caches_dropped: bool,
    /// Images were read back with readahead off (`--small-pages`).
    pub small_pages: bool,
    pub seed: u64,
    pub unix_time: u64,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub versions: Vec<(Kind, String)>,
}

#[derive(Debug, Default)]
pub struct Results {
    /// Cases in the order they were planned.
    pub cases: Vec<Case>,
    pub cells: BTreeMap<(Case, Kind), Cell>,
    /// (backend, configuration, why): configurations a backend could not
    /// serve.
    pub skipped: Vec<(Kind, Config, String)>,
    pub backends: Vec<Kind>,
    pub meta: Meta,
}

impl Results {
    pub fn cell_mut(&mut self, case: Case, kind: Kind) -> &mut Cell {
        if !self.cases.contains(&case) {
            self.cases.push(case);
        }
        self.cells.entry((case, kind)).or_default()
    }

    pub fn cell(&self, case: &Case, kind: Kind) -> Option<&Cell> {
        self.cells.get(&(*case, kind))
    }

    pub fn skip_reason(&self, kind: Kind, config: Config) -> Option<&str> {
        self.skipped
            .iter()
            .find(|(k, c, _)| *k == kind && *c == config)
            .map(|(_, _, r)| r.as_str())
    }
}
