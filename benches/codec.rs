//! The result codec against JSON, which idem 0.1 stored results in: `encode` vs
//! `serde_json::to_vec`, `decode` vs `serde_json::from_slice`, and `encode_checked` (encode, decode,
//! encode again, compare), for a small struct and for a struct with a 64 KiB `Vec<u8>` body.
//!
//! The unchecked encoder is not public API; the benchmark reaches it through a hidden hook.
//!
//! Run with `cargo bench -p idem-benches --bench codec` (add `-- --quick` for a short run).

use idem::__private::codec_bench as codec;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A small result: ids, a string, an option, a float.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Small {
    id: u64,
    account: u32,
    name: String,
    note: Option<String>,
    amount: f64,
}

/// A result with a body: a `Vec<u8>`, which serde serializes as a sequence of `u8`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Body {
    id: u64,
    content_type: String,
    body: Vec<u8>,
}

fn small() -> Small {
    Small {
        id: 1_234_567,
        account: 42,
        name: "Ada Lovelace".into(),
        note: Some("first order".into()),
        amount: 1299.95,
    }
}

fn body() -> Body {
    // Bytes of every value, in no particular order (an LCG), as a compressed body would be.
    let mut state = 0x2545_f491_u32;
    let body = (0..64 * 1024)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    Body {
        id: 7,
        content_type: "application/octet-stream".into(),
        body,
    }
}

/// Measures one value: JSON against the codec, both ways, and the checked encoding.
fn compare<T: Serialize + DeserializeOwned + PartialEq>(c: &mut Criterion, name: &str, value: T) {
    let json = serde_json::to_vec(&value).unwrap();
    let idem = codec::encode(&value).unwrap();
    assert!(codec::decode::<T>(&idem).unwrap() == value);
    assert_eq!(codec::encode_checked(&value).unwrap(), idem);
    println!(
        "{name}: JSON {} bytes, idem {} bytes",
        json.len(),
        idem.len()
    );

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(idem.len() as u64));
    group.bench_function("encode/json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&value)).unwrap())
    });
    group.bench_function("encode/idem", |b| {
        b.iter(|| codec::encode(black_box(&value)).unwrap())
    });
    group.bench_function("decode/json", |b| {
        b.iter(|| serde_json::from_slice::<T>(black_box(&json)).unwrap())
    });
    group.bench_function("decode/idem", |b| {
        b.iter(|| codec::decode::<T>(black_box(&idem)).unwrap())
    });
    group.bench_function("encode_checked/idem", |b| {
        b.iter(|| codec::encode_checked(black_box(&value)).unwrap())
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    compare(c, "codec_small", small());
    compare(c, "codec_64k_body", body());
}

criterion_group!(benches, bench);
criterion_main!(benches);
