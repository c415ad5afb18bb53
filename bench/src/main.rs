//! vubd-bench: the same libblkio workloads against qemu-storage-daemon and
//! vubd, with medians and vubd/qsd ratios. See `scripts/bench` and
//! `vubd-bench --help`.
//!
//! Modules: `backend` (daemon command lines, processes, /proc figures),
//! `image` (image files and the page cache), `workload` (workloads and the
//! libblkio client), `stats` (offsets, percentiles, medians), `results` and
//! `report` (tables, markdown, JSON), `runner` (the plan), `opts`.

mod backend;
mod image;
mod opts;
mod report;
mod results;
mod runner;
mod stats;
mod workload;

use std::fs;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match opts::parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{}", opts::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vubd-bench: {e}\n\n{}", opts::USAGE);
            return ExitCode::from(2);
        }
    };
    let results = match runner::run_all(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vubd-bench: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!();
    for case in &results.cases {
        println!("{}", report::case_table(&results, case));
    }
    print!("{}", report::summary_table(&results));

    let mut ok = true;
    if let Some(p) = &opts.json {
        if let Err(e) = fs::write(p, report::json(&results)) {
            eprintln!("vubd-bench: cannot write {}: {e}", p.display());
            ok = false;
        } else {
            eprintln!("bench: JSON written to {}", p.display());
        }
    }
    if let Some(p) = &opts.markdown {
        if let Err(e) = fs::write(p, report::markdown(&results)) {
            eprintln!("vubd-bench: cannot write {}: {e}", p.display());
            ok = false;
        } else {
            eprintln!("bench: markdown written to {}", p.display());
        }
    }
    let any_qsd = results
        .cells
        .iter()
        .any(|((_, k), c)| *k == backend::Kind::Qsd && !c.runs.is_empty());
    if opts.backends.contains(&backend::Kind::Qsd) && !any_qsd {
        eprintln!("vubd-bench: no qsd run succeeded");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
