//! Prometheus text-format metrics, kept by hand (a few counters and one histogram do not need a
//! metrics library).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kiln_engine::scheduler::{Finish, SchedulerStats};

/// Upper bounds of the time-to-first-token histogram, seconds.
const TTFT_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status code) → responses.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    ttft: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Metrics {
    pub fn record_response(&self, endpoint: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint, status)).or_default() += 1;
    }

    /// Records a request that ran to its end.
    pub fn record_finish(&self, f: &Finish) {
        self.prompt_tokens.fetch_add(f.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens.fetch_add(f.cached_tokens as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(f.completion_tokens as u64, Ordering::Relaxed);
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in TTFT_BUCKETS.iter().enumerate() {
            if f.first_token_seconds <= b {
                h.counts[i] += 1;
            }
        }
        h.sum += f.first_token_seconds;
        h.n += 1;
    }

    pub fn render(&self, s: &SchedulerStats, slots: usize) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut o, "kiln_requests_total", "counter", "HTTP responses by endpoint and status code.");
        for ((ep, st), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "kiln_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}");
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            ("kiln_prompt_tokens_total", "Prompt tokens of finished requests.", load(&self.prompt_tokens)),
            (
                "kiln_prompt_tokens_cached_total",
                "Prompt tokens reused from a slot's cache (prefix cache hits).",
                load(&self.cached_tokens),
            ),
            ("kiln_completion_tokens_total", "Tokens generated for finished requests.", load(&self.completion_tokens)),
            (
                "kiln_prompt_tokens_evaluated_total",
                "Prompt tokens run through the model.",
                load(&s.prompt_tokens_evaluated),
            ),
            ("kiln_generated_tokens_total", "Tokens sampled, all requests.", load(&s.generated_tokens)),
            ("kiln_forward_steps_total", "Batched forward steps.", load(&s.steps)),
            (
                "kiln_spec_verifications_total",
                "Speculative decoding: sequence steps that verified drafted tokens.",
                load(&s.spec_verifications),
            ),
            ("kiln_spec_drafted_tokens_total", "Speculative decoding: tokens drafted.", load(&s.spec_drafted)),
            (
                "kiln_spec_accepted_tokens_total",
                "Speculative decoding: drafted tokens accepted (the model produced them).",
                load(&s.spec_accepted),
            ),
        ];
        for (name, help, v) in counters {
            head(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {v}");
        }
        let busy = load(&s.busy_micros) as f64 / 1e6;
        head(&mut o, "kiln_forward_seconds_total", "counter", "Time spent in forward steps.");
        let _ = writeln!(o, "kiln_forward_seconds_total {busy:.6}");
        let tps = if busy > 0.0 { load(&s.generated_tokens) as f64 / busy } else { 0.0 };
        let (drafted, accepted, verifications) =
            (load(&s.spec_drafted) as f64, load(&s.spec_accepted) as f64, load(&s.spec_verifications) as f64);
        let gauges = [
            (
                "kiln_spec_acceptance_rate",
                "Speculative decoding: accepted per drafted token, since start.",
                if drafted > 0.0 { accepted / drafted } else { 0.0 },
            ),
            (
                "kiln_spec_tokens_per_verification",
                "Speculative decoding: tokens a verification produced (accepted drafts and the model's own), since start.",
                if verifications > 0.0 { (accepted + verifications) / verifications } else { 0.0 },
            ),
            ("kiln_queue_depth", "Requests waiting for a slot.", s.queued.load(Ordering::SeqCst) as f64),
            (
                "kiln_running_requests",
                "Requests being read or generated (holding a slot).",
                s.active.load(Ordering::SeqCst) as f64,
            ),
            (
                "kiln_prefix_cache_hit_rate",
                "Prompt tokens reused from cached keys and values per prompt token, since start.",
                {
                    let (c, e) = (load(&s.prompt_tokens_cached) as f64, load(&s.prompt_tokens_evaluated) as f64);
                    if c + e > 0.0 { c / (c + e) } else { 0.0 }
                },
            ),
            ("kiln_slots_busy", "Slots running a request.", s.active.load(Ordering::SeqCst) as f64),
            ("kiln_slots", "Slots (sequences decoded together).", slots as f64),
            ("kiln_tokens_per_second", "Generated tokens per second of forward time, all slots together.", tps),
            (
                "kiln_scheduler_up",
                "1 while the scheduler runs, 0 once it has failed (see /health for why).",
                if s.failure().is_some() { 0.0 } else { 1.0 },
            ),
        ];
        for (name, help, v) in gauges {
            head(&mut o, name, "gauge", help);
            let _ = writeln!(o, "{name} {v}");
        }
        let total = s.kv_blocks_total.load(Ordering::Relaxed);
        if total > 0 {
            // The GPU's paged KV cache (the CPU's slots each own a whole cache: nothing to count).
            let blocks = [
                (
                    "kiln_kv_blocks_used",
                    "GPU KV cache blocks used by running requests.",
                    s.kv_blocks_used.load(Ordering::Relaxed),
                ),
                (
                    "kiln_kv_blocks_cached",
                    "GPU KV cache blocks kept for prefix sharing, used by no request (evicted when needed).",
                    s.kv_blocks_cached.load(Ordering::Relaxed),
                ),
                ("kiln_kv_blocks_total", "GPU KV cache blocks in all.", total),
            ];
            for (name, help, v) in blocks {
                head(&mut o, name, "gauge", help);
                let _ = writeln!(o, "{name} {v}");
            }
        }
        let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let name = "kiln_time_to_first_token_seconds";
        head(&mut o, name, "histogram", "From request submission to its first generated token.");
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {:.6}\n{name}_count {}", h.n, h.sum, h.n);
        o
    }
}
