//! Reports: a table per workload and a summary on the terminal, a markdown
//! table for the README and JSON for tools. All figures are medians over the
//! repetitions; ratios are vubd / qsd (above 1 is better for IOPS and MiB/s,
//! below 1 is better for latency, CPU and memory).

use std::fmt::Write as _;

use crate::backend::{Config, Kind};
use crate::results::{Case, Cell, Results};
use crate::stats::{geomean, median, median_of, Metric, RunStats};

fn med(cell: Option<&Cell>, m: Metric) -> Option<f64> {
    cell.and_then(|c| median_of(&c.runs, m))
}

fn ratio(vubd: Option<f64>, qsd: Option<f64>) -> Option<f64> {
    match (vubd, qsd) {
        (Some(v), Some(q)) if q > 0.0 && v.is_finite() => Some(v / q),
        _ => None,
    }
}

/// A metric value in a width-friendly form.
pub fn fmt_value(m: Metric, v: Option<f64>) -> String {
    let Some(v) = v.filter(|v| v.is_finite()) else {
        return "-".to_string();
    };
    match m {
        Metric::Iops => format!("{v:.0}"),
        Metric::MibS => format!("{v:.1}"),
        Metric::P50 | Metric::P99 => {
            if v < 100.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        }
        Metric::CpuPerReq => format!("{v:.2}"),
        Metric::Rss => format!("{v:.1}"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".to_string(), |r| format!("{r:.2}"))
}

/// IOPS in a short form (`123.4k`) for the summary.
fn fmt_short_iops(v: Option<f64>) -> String {
    match v.filter(|v| v.is_finite()) {
        None => "-".to_string(),
        Some(v) if v >= 100_000.0 => format!("{:.0}k", v / 1000.0),
        Some(v) if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        Some(v) => format!("{v:.0}"),
    }
}

/// What to print instead of a number when a backend has none.
fn absence(results: &Results, case: &Case, kind: Kind) -> Option<String> {
    if !results.backends.contains(&kind) {
        return Some(format!("{} not selected", kind.name()));
    }
    if let Some(r) = results.skip_reason(kind, case.config) {
        return Some(format!("{} skipped: {r}", kind.name()));
    }
    match results.cell(case, kind) {
        None => Some(format!("{}: no runs", kind.name())),
        Some(c) if c.runs.is_empty() => Some(format!(
            "{} failed: {}",
            kind.name(),
            c.errors.first().map_or("no successful run", |e| e.as_str())
        )),
        _ => None,
    }
}

/// The table for one case: one row per metric, columns qsd, vubd, ratio.
pub fn case_table(results: &Results, case: &Case) -> String {
    let q = results.cell(case, Kind::Qsd);
    let v = results.cell(case, Kind::Vubd);
    let mut s = String::new();
    let runs = |c: Option<&Cell>| c.map_or(0, |c| c.runs.len());
    let _ = writeln!(
        s,
        "── {} ── (median of {}/{} runs; vubd: {})",
        case.title(),
        runs(q),
        runs(v),
        v.map_or("-", |c| c.threads.as_str())
    );
    let _ = writeln!(
        s,
        "  {:<14} {:>12} {:>12} {:>10}",
        "", "qsd", "vubd", "vubd/qsd"
    );
    for m in Metric::ALL {
        let (a, b) = (med(q, m), med(v, m));
        let _ = writeln!(
            s,
            "  {:<14} {:>12} {:>12} {:>10}",
            m.label(),
            fmt_value(m, a),
            fmt_value(m, b),
            fmt_ratio(ratio(b, a))
        );
    }
    for kind in [Kind::Qsd, Kind::Vubd] {
        if let Some(why) = absence(results, case, kind) {
            let _ = writeln!(s, "  ({why})");
        } else if let Some(c) = results.cell(case, kind) {
            for e in &c.errors {
                let _ = writeln!(s, "  ({} run failed: {e})", kind.name());
            }
        }
    }
    s
}

/// One line of the live progress output; a window shorter than the
/// planned `duration_s` (a single pass that filled the image) is noted.
pub fn progress_line(
    rep: usize,
    reps: usize,
    case: &Case,
    kind: Kind,
    r: &RunStats,
    duration_s: f64,
) -> String {
    let mut line = format!(
        "[{}/{}] {:<11} {:<4} {:<4} {:<19} {:>8.0} IOPS {:>8.1} MiB/s  p50 {:>7} µs  p99 {:>7} µs  CPU {:>6.2} µs/req  RSS {:>6.1} MiB",
        rep + 1,
        reps,
        case.config.name(),
        case.setup.name(),
        kind.name(),
        case.workload.name(),
        r.iops,
        r.mib_s,
        fmt_value(Metric::P50, Some(r.p50_us)),
        fmt_value(Metric::P99, Some(r.p99_us)),
        r.cpu_us_per_req,
        r.rss_mib
    );
    if short_window(r.seconds, duration_s) {
        let _ = write!(line, "  (image full after {:.2} s)", r.seconds);
    }
    line
}

fn short_window(seconds: f64, duration_s: f64) -> bool {
    seconds < duration_s * 0.999
}

/// Notes on what the new qcow2 images are, and on measurement windows cut
/// short because a single pass filled the image: one sentence each.
pub fn notes(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let configs = configs_in(results);
    if configs.contains(&Config::Qcow2Meta) {
        out.push(
            "qcow2-meta is a qcow2 image made with qemu-img create -o preallocation=metadata \
             (anew before every session that writes): all clusters are mapped, but the file \
             holds holes there, so reads return zeroes and writes fill the file without \
             allocating clusters."
                .to_string(),
        );
    }
    if configs.contains(&Config::Qcow2Fresh) {
        out.push(
            "qcow2-fresh is a new qcow2 image (qemu-img create, no preallocation) made anew \
             before every write workload, so that each starts with no cluster allocated; it \
             has no read workloads. A random write allocates the cluster it lands in unless an \
             earlier one did, so the share of allocating writes falls during the run, and \
             faster for a faster backend."
                .to_string(),
        );
        if results.meta.small_pages {
            out.push(
                "--small-pages gives 4 KiB pages to what is read back; qcow2-fresh's clusters \
                 lie beyond the end of the file then, and get the pages the kernel's write path \
                 makes."
                    .to_string(),
            );
        }
    }
    if configs.iter().any(|c| c.renews_image()) {
        out.push(format!(
            "Sequential writes to qcow2-meta and qcow2-fresh go through an image of {} MiB \
             once (warm-up at most 0.1 s), so that every write lands where nothing was written \
             before; the window ends when the image is full.",
            results.meta.pass_mib
        ));
    }
    let mut short = Vec::new();
    for case in &results.cases {
        let mut parts = Vec::new();
        for kind in [Kind::Qsd, Kind::Vubd] {
            let secs = results
                .cell(case, kind)
                .and_then(|c| median(&c.runs.iter().map(|r| r.seconds).collect::<Vec<_>>()));
            if let Some(secs) = secs.filter(|&x| short_window(x, results.meta.duration_s)) {
                parts.push(format!("{} {secs:.2} s", kind.name()));
            }
        }
        if !parts.is_empty() {
            short.push(format!("{} ({})", case.title(), parts.join(", ")));
        }
    }
    if !short.is_empty() {
        out.push(format!(
            "Windows shorter than {} s because the image was full (medians): {}.",
            results.meta.duration_s,
            short.join("; ")
        ));
    }
    out
}

const SUMMARY_METRICS: [Metric; 5] = [
    Metric::Iops,
    Metric::P50,
    Metric::P99,
    Metric::CpuPerReq,
    Metric::Rss,
];

/// Geometric mean of the vubd/qsd ratios of one metric over the cases of
/// one configuration that have both figures.
fn config_geomean(results: &Results, config: Config, m: Metric) -> Option<f64> {
    let rs: Vec<f64> = results
        .cases
        .iter()
        .filter(|c| c.config == config)
        .filter_map(|c| {
            ratio(
                med(results.cell(c, Kind::Vubd), m),
                med(results.cell(c, Kind::Qsd), m),
            )
        })
        .collect();
    geomean(&rs)
}

fn configs_in(results: &Results) -> Vec<Config> {
    let mut v: Vec<Config> = results.cases.iter().map(|c| c.config).collect();
    v.dedup();
    v
}

/// The final summary: one line per case, qsd | vubd | ratio per metric.
pub fn summary_table(results: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Summary (medians; ×: vubd/qsd, IOPS higher is better, the rest lower is better)"
    );
    let mut head = format!("{:<12}{:<9}{:<20}", "config", "q", "workload");
    for m in SUMMARY_METRICS {
        let label = match m {
            Metric::Iops => "IOPS",
            Metric::P50 => "p50 µs",
            Metric::P99 => "p99 µs",
            Metric::CpuPerReq => "CPU µs/req",
            _ => "RSS MiB",
        };
        let _ = write!(head, "│ {:^24}", label);
    }
    let _ = writeln!(s, "{head}");
    let mut sub = format!("{:<41}", "");
    for _ in SUMMARY_METRICS {
        let _ = write!(sub, "│ {:>7} {:>7} {:>7} ", "qsd", "vubd", "×");
    }
    let _ = writeln!(s, "{}", sub.trim_end());
    let row = |m: Metric, q: Option<f64>, v: Option<f64>| {
        let f = |x| {
            if m == Metric::Iops {
                fmt_short_iops(x)
            } else {
                fmt_value(m, x)
            }
        };
        format!("│ {:>7} {:>7} {:>7} ", f(q), f(v), fmt_ratio(ratio(v, q)))
    };
    for config in configs_in(results) {
        for case in results.cases.iter().filter(|c| c.config == config) {
            let q = results.cell(case, Kind::Qsd);
            let v = results.cell(case, Kind::Vubd);
            let mut line = format!(
                "{:<12}{:<9}{:<20}",
                case.config.name(),
                case.setup.name(),
                case.workload.name()
            );
            for m in SUMMARY_METRICS {
                line.push_str(&row(m, med(q, m), med(v, m)));
            }
            let _ = writeln!(s, "{}", line.trim_end());
        }
        let mut line = format!("{:<41}", format!("{} geomean", config.name()));
        for m in SUMMARY_METRICS {
            let _ = write!(
                line,
                "│ {:>7} {:>7} {:>7} ",
                "",
                "",
                fmt_ratio(config_geomean(results, config, m))
            );
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
    for (kind, config, why) in &results.skipped {
        let _ = writeln!(s, "{} skipped for {}: {why}", kind.name(), config.name());
    }
    for note in notes(results) {
        let _ = writeln!(s, "{note}");
    }
    s
}

/// A markdown section with one table of every case, for the README.
pub fn markdown(results: &Results) -> String {
    let m = &results.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Medians of {} run(s) of {} s (after {} s of warm-up) per workload and backend, \
         libblkio virtio-blk-vhost-user client, {} CPU(s) ({}), Linux {}. \
         QD is per queue; 2q runs use two client threads, one per queue. \
         CPU is the daemon's user+system time per request (µs/req, equal to s per million requests); \
         RSS is its peak (VmHWM). × is vubd/qsd.{}{}",
        m.reps,
        m.duration_s,
        m.warmup_s,
        m.cpus,
        m.cpu,
        m.kernel,
        if m.caches_dropped {
            ""
        } else {
            " (The page cache was not dropped between backends.)"
        },
        if m.small_pages {
            " Images were read back with readahead off (--small-pages): the page cache holds 4 KiB pages."
        } else {
            ""
        }
    );
    let any_defaults = results.cases.iter().any(|c| c.setup.defaults());
    let any_tuned = results.cases.iter().any(|c| !c.setup.defaults());
    if any_defaults {
        let _ = writeln!(
            s,
            "\nRows marked defaults: both daemons started with no iothread object and no polling \
             option, only --blockdev and --export (qsd serves the export from its main loop, vubd \
             from a private thread per queue).{}",
            if any_tuned {
                " The other rows give both the same iothreads, polling for up to 32768 ns."
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| backing | queues | workload | IOPS qsd | IOPS vubd | × | MiB/s qsd | MiB/s vubd | p50 µs qsd | p50 µs vubd | × | p99 µs qsd | p99 µs vubd | × | CPU µs/req qsd | CPU µs/req vubd | × | RSS MiB qsd | RSS MiB vubd | × |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for case in &results.cases {
        let q = results.cell(case, Kind::Qsd);
        let v = results.cell(case, Kind::Vubd);
        let mut line = format!(
            "| {} | {} | {} ",
            case.config.name(),
            case.setup.describe(),
            case.workload.name()
        );
        for metric in Metric::ALL {
            let (a, b) = (med(q, metric), med(v, metric));
            let _ = write!(
                line,
                "| {} | {} ",
                fmt_value(metric, a),
                fmt_value(metric, b)
            );
            if metric != Metric::MibS {
                let _ = write!(line, "| {} ", fmt_ratio(ratio(b, a)));
            }
        }
        let _ = writeln!(s, "{line}|");
    }
    let mut threads: Vec<String> = Vec::new();
    for ((case, kind), cell) in &results.cells {
        if case.setup.queues() > 1 && !cell.runs.is_empty() {
            let t = format!("{} {}", kind.name(), cell.threads);
            if !threads.contains(&t) {
                threads.push(t);
            }
        }
    }
    if !threads.is_empty() {
        let _ = writeln!(
            s,
            "\nThreads serving the 2-queue exports: {}.",
            threads.join(", ")
        );
    }
    for config in configs_in(results) {
        let parts: Vec<String> = SUMMARY_METRICS
            .iter()
            .filter_map(|&m| {
                config_geomean(results, config, m).map(|g| format!("{} {g:.2}", m.label()))
            })
            .collect();
        if !parts.is_empty() {
            let _ = writeln!(
                s,
                "\nGeometric mean of vubd/qsd for {}: {}.",
                config.name(),
                parts.join(", ")
            );
        }
    }
    for (kind, config, why) in &results.skipped {
        let _ = writeln!(
            s,
            "\n{} was skipped for {}: {why}.",
            kind.name(),
            config.name()
        );
    }
    for note in notes(results) {
        let _ = writeln!(s, "\n{note}");
    }
    s
}

/// Minimal JSON writing (the crate has no serde).
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: Option<f64>) -> String {
    match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{}", (v * 1000.0).round() / 1000.0),
        None => "null".to_string(),
    }
}

fn json_run(r: &RunStats) -> String {
    format!(
        "{{\"requests\": {}, \"seconds\": {}, \"iops\": {}, \"mib_s\": {}, \"p50_us\": {}, \"p99_us\": {}, \"cpu_s\": {}, \"cpu_us_per_req\": {}, \"cpu_s_per_million_req\": {}, \"peak_rss_mib\": {}}}",
        r.requests,
        json_num(Some(r.seconds)),
        json_num(Some(r.iops)),
        json_num(Some(r.mib_s)),
        json_num(Some(r.p50_us)),
        json_num(Some(r.p99_us)),
        json_num(Some(r.cpu_s)),
        json_num(Some(r.cpu_us_per_req)),
        json_num(Some(r.cpu_us_per_req)),
        json_num(Some(r.rss_mib)),
    )
}

fn json_cell(results: &Results, case: &Case, kind: Kind) -> String {
    let Some(c) = results.cell(case, kind) else {
        return "null".to_string();
    };
    let median: Vec<String> = Metric::ALL
        .iter()
        .map(|&m| format!("{}: {}", json_str(m.key()), json_num(median_of(&c.runs, m))))
        .collect();
    let runs: Vec<String> = c.runs.iter().map(json_run).collect();
    let errors: Vec<String> = c.errors.iter().map(|e| json_str(e)).collect();
    format!(
        "{{\"threads\": {}, \"median\": {{{}}}, \"runs\": [{}], \"errors\": [{}]}}",
        json_str(&c.threads),
        median.join(", "),
        runs.join(", "),
        errors.join(", ")
    )
}

/// Everything as JSON: parameters, every run, medians and ratios.
pub fn json(results: &Results) -> String {
    let m = &results.meta;
    let mut s = String::new();
    let versions: Vec<String> = m
        .versions
        .iter()
        .map(|(k, v)| format!("{}: {}", json_str(k.name()), json_str(v)))
        .collect();
    let _ = writeln!(s, "{{");
    let _ = writeln!(
        s,
        "  \"meta\": {{\"unix_time\": {}, \"duration_s\": {}, \"warmup_s\": {}, \"reps\": {}, \"image_mib\": {}, \"pass_mib\": {}, \"page_cache_dropped\": {}, \"small_pages\": {}, \"seed\": {}, \"kernel\": {}, \"cpu\": {}, \"cpus\": {}, \"versions\": {{{}}}, \"ratio\": \"vubd/qsd\", \"qd\": \"per queue\"}},",
        m.unix_time,
        json_num(Some(m.duration_s)),
        json_num(Some(m.warmup_s)),
        m.reps,
        m.image_mib,
        m.pass_mib,
        m.caches_dropped,
        m.small_pages,
        m.seed,
        json_str(&m.kernel),
        json_str(&m.cpu),
        m.cpus,
        versions.join(", ")
    );
    let skipped: Vec<String> = results
        .skipped
        .iter()
        .map(|(k, c, why)| {
            format!(
                "{{\"backend\": {}, \"config\": {}, \"reason\": {}}}",
                json_str(k.name()),
                json_str(c.name()),
                json_str(why)
            )
        })
        .collect();
    let _ = writeln!(s, "  \"skipped\": [{}],", skipped.join(", "));
    let _ = writeln!(s, "  \"results\": [");
    let n = results.cases.len();
    for (i, case) in results.cases.iter().enumerate() {
        let q = results.cell(case, Kind::Qsd);
        let v = results.cell(case, Kind::Vubd);
        let ratios: Vec<String> = Metric::ALL
            .iter()
            .map(|&m| {
                format!(
                    "{}: {}",
                    json_str(m.key()),
                    json_num(ratio(med(v, m), med(q, m)))
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "    {{\"config\": {}, \"queues\": {}, \"setup\": {}, \"workload\": {}, \"pattern\": {}, \"block_size\": {}, \"queue_depth\": {}, \"qsd\": {}, \"vubd\": {}, \"ratio\": {{{}}}}}{}",
            json_str(case.config.name()),
            case.setup.queues(),
            json_str(case.setup.name()),
            json_str(&case.workload.name()),
            json_str(case.workload.pattern.name()),
            case.workload.bs,
            case.workload.qd,
            json_cell(results, case, Kind::Qsd),
            json_cell(results, case, Kind::Vubd),
            ratios.join(", "),
            if i + 1 < n { "," } else { "" }
        );
    }
    let _ = writeln!(s, "  ]");
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Results;
    use crate::workload::{Pattern, Setup, Workload};

    fn sample() -> Results {
        let mut r = Results {
            backends: vec![Kind::Qsd, Kind::Vubd],
            ..Default::default()
        };
        let case = Case {
            config: Config::Null,
            setup: Setup::OneQueue,
            workload: Workload {
                pattern: Pattern::RandRead,
                bs: 4096,
                qd: 1,
            },
        };
        let run = |iops: f64| RunStats {
            requests: 10,
            seconds: 1.0,
            iops,
            mib_s: iops / 256.0,
            p50_us: 10.0,
            p99_us: 20.0,
            cpu_s: 0.5,
            cpu_us_per_req: 5.0,
            rss_mib: 30.0,
        };
        let c = r.cell_mut(case, Kind::Qsd);
        c.runs = vec![run(100.0), run(300.0), run(200.0)];
        c.threads = "1 iothread".into();
        let c = r.cell_mut(case, Kind::Vubd);
        c.runs = vec![run(400.0)];
        c.errors.push("a \"quoted\" error".into());
        r.skipped
            .push((Kind::Vubd, Config::Qcow2, "no qcow2".into()));
        r
    }

    #[test]
    fn tables_show_medians_and_ratios() {
        let r = sample();
        let case = r.cases[0];
        let t = case_table(&r, &case);
        assert!(t.contains("200"), "{t}");
        assert!(t.contains("2.00"), "{t}");
        let s = summary_table(&r);
        assert!(s.contains("null geomean"), "{s}");
        assert!(s.contains("vubd skipped for qcow2"), "{s}");
        let md = markdown(&r);
        assert!(
            md.contains("| null | 1 queue | randread 4k QD1 | 200 | 400 | 2.00 |"),
            "{md}"
        );
    }

    #[test]
    fn notes_on_new_images_and_short_windows() {
        let mut r = sample();
        r.meta.duration_s = 1.0;
        assert!(notes(&r).is_empty());
        let case = Case {
            config: Config::Qcow2Fresh,
            setup: Setup::OneQueue,
            workload: Workload {
                pattern: Pattern::SeqWrite,
                bs: 65536,
                qd: 8,
            },
        };
        let run = |seconds: f64| RunStats {
            requests: 100,
            seconds,
            iops: 100.0 / seconds,
            ..Default::default()
        };
        r.cell_mut(case, Kind::Qsd).runs = vec![run(1.0), run(0.5), run(0.25)];
        r.cell_mut(case, Kind::Vubd).runs = vec![run(1.0)];
        let n = notes(&r);
        assert_eq!(n.len(), 3, "{n:?}");
        assert!(n[0].starts_with("qcow2-fresh is a new qcow2 image"));
        assert_eq!(
            n[2],
            "Windows shorter than 1 s because the image was full (medians): \
             qcow2-fresh, 1 queue, seqwrite 64k QD8 (qsd 0.50 s)."
        );
        assert!(markdown(&r).contains(&n[2]));
        r.meta.small_pages = true;
        assert!(notes(&r)[1].starts_with("--small-pages gives 4 KiB pages"));
        assert!(summary_table(&r).contains("qcow2-fresh 1q       seqwrite 64k QD8"));
        let line = progress_line(0, 1, &case, Kind::Qsd, &run(0.5), 1.0);
        assert!(line.ends_with("(image full after 0.50 s)"), "{line}");
        assert!(!progress_line(0, 1, &case, Kind::Qsd, &run(1.0), 1.0).contains("full"));
    }

    #[test]
    fn json_is_well_formed_enough() {
        let j = json(&sample());
        assert!(j.contains("\"iops\": 2"), "{j}");
        assert!(j.contains("a \\\"quoted\\\" error"));
        let opens = j.matches('{').count();
        let closes = j.matches('}').count();
        assert_eq!(opens, closes);
        assert_eq!(json_num(Some(f64::NAN)), "null");
        assert_eq!(json_str("a\nb"), "\"a\\nb\"");
    }
}
