//! Writes N realistic runners as an import file, quickly and always the same
//! bytes for the same arguments, for `comfy-runners runner import`.
//!
//!     cargo run --release --example seed -- N OUT.json [SHARE...]
//!
//! Without shares, OUT.json holds all N runners. With shares (relative
//! weights, such as `90 9 1`), the N runners are split between users in those
//! proportions: OUT.json holds the first user's, OUT.2.json the second's, and
//! so on, each to be imported with its own `--user`.
//!
//! Runners are written newest first, as `runner export` writes them. About a
//! quarter share their `created_at` second with the next one, so the list's
//! tie-break (creation order) is exercised as well.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use comfy_runners::clock;
use serde::Serialize;

/// 2025-06-01T00:00:00Z: the newest runner's time. Fixed, so that the output
/// does not depend on the day it is made.
const NEWEST: i64 = 1_748_736_000;

/// SplitMix64: tiny, fast, and good enough to make data look varied.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n`; the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next().to_le_bytes());
        b[8..].copy_from_slice(&self.next().to_le_bytes());
        b
    }

    fn alphanumeric(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..len).map(|_| *self.pick(CHARS) as char).collect()
    }
}

const NAMES: &[&str] = &[
    "GPU runner",
    "ComfyUI node",
    "Render box",
    "SDXL worker",
    "Flux worker",
];
const TAGS: &[&str] = &[
    "production",
    "staging",
    "dev",
    "gpu-a100",
    "gpu-h100",
    "gpu-4090",
    "gpu-3090",
    "sdxl",
    "flux",
    "video",
    "upscale",
    "eu-west",
    "us-east",
    "spot",
];

/// One runner of an import file: the API's object without `user_id`, which
/// the import sets.
#[derive(Serialize)]
struct Runner<'a> {
    id: &'a str,
    name: String,
    status: &'static str,
    endpoint: String,
    tags: Vec<&'static str>,
    headers: BTreeMap<&'static str, String>,
    created_at: &'a str,
    updated_at: &'a str,
}

/// Writes `count` runners to `path` as `{"runners":[...],"total":N}`.
fn write_file(path: &Path, count: u64, rng: &mut Rng) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(b"{\"runners\":[")?;
    let mut created = NEWEST;
    let mut id_buf = uuid::Uuid::encode_buffer();
    for i in 0..count {
        // Gaps of 0-120 s, a quarter of them 0: ties, and about 1.4 years per
        // million runners.
        if rng.below(4) != 0 {
            created -= 1 + rng.below(120) as i64;
        }
        // A third were edited some time after they were registered.
        let updated = if rng.below(3) == 0 {
            (created + rng.below(30 * 86_400) as i64).min(NEWEST)
        } else {
            created
        };
        // from_random_bytes sets the version and variant bits of a v4 UUID.
        let uuid = uuid::Builder::from_random_bytes(rng.bytes16()).into_uuid();
        let id = uuid.hyphenated().encode_lower(&mut id_buf);

        let mut tags = Vec::with_capacity(3);
        for _ in 0..1 + rng.below(3) {
            let tag = *rng.pick(TAGS);
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        let mut headers = BTreeMap::new();
        let n_headers = rng.below(3);
        if n_headers >= 1 {
            headers.insert("Authorization", format!("Bearer {}", rng.alphanumeric(32)));
        }
        if n_headers >= 2 {
            headers.insert("X-Comfy-Client", format!("bench-{}", rng.below(1_000)));
        }
        let (created_at, updated_at) = (clock::format(created), clock::format(updated));
        let runner = Runner {
            id,
            name: format!("{} {:06}", rng.pick(NAMES), rng.below(1_000_000)),
            status: if rng.below(3) == 0 {
                "disabled"
            } else {
                "active"
            },
            endpoint: format!(
                "http://10.{}.{}.{}:8188",
                rng.below(256),
                rng.below(256),
                1 + rng.below(254)
            ),
            tags,
            headers,
            created_at: &created_at,
            updated_at: &updated_at,
        };
        if i > 0 {
            out.write_all(b",\n")?;
        } else {
            out.write_all(b"\n")?;
        }
        serde_json::to_writer(&mut out, &runner)?;
    }
    write!(out, "\n],\"total\":{count}}}\n")?;
    out.flush()
}

/// OUT.json for the first user, OUT.2.json, OUT.3.json, ... for the others.
fn file_for(out: &Path, user: usize) -> PathBuf {
    if user == 0 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.{}{ext}", user + 1))
}

/// `total` split by `shares`, the rounding left to the first user.
fn split(total: u64, shares: &[u64]) -> Vec<u64> {
    let sum: u64 = shares.iter().sum();
    let mut counts: Vec<u64> = shares
        .iter()
        .map(|s| (u128::from(total) * u128::from(*s) / u128::from(sum)) as u64)
        .collect();
    counts[0] += total - counts.iter().sum::<u64>();
    counts
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!("usage: seed N OUT.json [SHARE...]");
        ExitCode::from(2)
    };
    let (Some(n), Some(out)) = (
        args.first().and_then(|s| s.parse::<u64>().ok()),
        args.get(1),
    ) else {
        return usage();
    };
    let shares: Option<Vec<u64>> = args[2..].iter().map(|s| s.parse().ok()).collect();
    let shares = match shares {
        Some(s) if s.is_empty() => vec![1],
        Some(s) if s.iter().sum::<u64>() > 0 => s,
        _ => return usage(),
    };
    let out = Path::new(out);
    for (user, count) in split(n, &shares).into_iter().enumerate() {
        // Each user's file has its own stream, so adding a user leaves the
        // others' files as they were.
        let mut rng = Rng(0x5eed_0000 + user as u64);
        let path = file_for(out, user);
        if let Err(e) = write_file(&path, count, &mut rng) {
            eprintln!("seed: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("seed: wrote {count} runners to {}", path.display());
    }
    ExitCode::SUCCESS
}
