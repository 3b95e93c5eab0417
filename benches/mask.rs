//! Secret masking throughput: `cargo bench --bench mask`.
//!
//! Streams 256 MiB of log-like text (with a secret in one line in 10,000) through a `StreamMasker` in 64 KiB
//! chunks, as the exec output pump does, with the worker's usual needles (its token and one env secret,
//! each in 9 encodings) and with a pattern on top; a plain copy of the same chunks is the baseline.

use std::time::Instant;

use cla_common::mask::Masks;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total: usize = if quick { 16 << 20 } else { 256 << 20 };
    let secret = "Pa55-w0rd/for+the_DB";
    let token = "clatk_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let mut text = Vec::with_capacity(total + 4096);
    let mut i = 0u64;
    while text.len() < total {
        if i.is_multiple_of(10_000) {
            text.extend_from_slice(format!("line {i}: connecting with {secret}\n").as_bytes());
        } else {
            text.extend_from_slice(
                format!(
                    "2026-11-24T03:00:{:02}Z INFO step {i} done in {} ms, 0x{:08x}\n",
                    i % 60,
                    i % 997,
                    i * 2654435761
                )
                .as_bytes(),
            );
        }
        i += 1;
    }
    let chunk = 64 << 10;
    let mb = text.len() as f64 / 1e6;

    let t = Instant::now();
    let mut copied = 0usize;
    for c in text.chunks(chunk) {
        copied += std::hint::black_box(c.to_vec()).len();
    }
    let copy_s = t.elapsed().as_secs_f64();
    assert_eq!(copied, text.len());

    let mut results = Vec::new();
    for (name, masks) in [
        ("token + 1 secret", Masks::new(&[token, secret], &[]).unwrap()),
        (
            "token + 1 secret + 1 pattern",
            Masks::new(&[token, secret], &["AKIA[0-9A-Z]{16}".to_owned()]).unwrap(),
        ),
    ] {
        let t = Instant::now();
        let mut s = masks.stream();
        let mut out = 0usize;
        let mut masked = 0usize;
        for c in text.chunks(chunk) {
            let o = s.push(c);
            masked += o.windows(3).filter(|w| w == b"***").count();
            out += o.len();
        }
        out += s.finish().len();
        let secs = t.elapsed().as_secs_f64();
        assert!(masked >= (i / 10_000) as usize, "every secret masked");
        assert!(out < text.len());
        results.push((name, mb / secs, copy_s / secs));
    }
    println!("mask bench: {:.0} MB of text, 64 KiB chunks", mb);
    println!("  {:<30} {:>8.0} MB/s", "plain copy (baseline)", mb / copy_s);
    for (name, rate, ratio) in results {
        println!("  {name:<30} {rate:>8.0} MB/s  ({ratio:.2}x the copy)");
    }
}
