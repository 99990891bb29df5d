//! Name table costs, natively: compiling a table from JSON, loading a published image (what
//! each worker VM does), and answering a query, at 10 to 100,000 names.
//!
//! `cargo bench -p vmesh-bench --bench names`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vmesh_core::names::NameIndex;
use vmesh_core::responder::{respond, Transport};

/// A realistic table: Kubernetes services spread over 100 namespaces, every fifth name a
/// ServiceEntry host, one to three addresses each.
fn table_json(n: usize) -> Vec<u8> {
    let mut names = serde_json::Map::new();
    for i in 0..n {
        let ns = format!("ns{}", i % 100);
        let ips: Vec<String> = (0..(1 + i % 3))
            .map(|k| {
                format!(
                    "10.{}.{}.{}",
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    (i + k) & 255
                )
            })
            .collect();
        if i % 5 == 0 {
            names.insert(
                format!("svc{i}.example.com"),
                serde_json::json!({"ips": ips, "registry": "External"}),
            );
        } else {
            names.insert(
                format!("svc{i}.{ns}.svc.cluster.local"),
                serde_json::json!({"ips": ips, "registry": "Kubernetes", "shortname": format!("svc{i}"), "namespace": ns}),
            );
        }
    }
    serde_json::to_vec(&serde_json::json!({
        "version": "bench", "namespace": "ns1",
        "searchDomains": ["ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        "names": names,
    }))
    .expect("serialize")
}

fn query(name: &str) -> Vec<u8> {
    vmesh_core::dns::build_query(0x1234, name, 1, None).expect("name")
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile_from_json");
    g.sample_size(10);
    for n in [1_000, 10_000, 100_000] {
        let json = table_json(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &json, |b, json| {
            b.iter(|| NameIndex::from_json(black_box(json)).expect("table"))
        });
    }
    g.finish();
}

fn load_image(c: &mut Criterion) {
    let mut g = c.benchmark_group("load_published_image");
    g.sample_size(10);
    for n in [1_000, 100_000] {
        let image = NameIndex::from_json(&table_json(n))
            .expect("table")
            .image()
            .to_vec();
        g.bench_with_input(BenchmarkId::from_parameter(n), &image, |b, image| {
            b.iter(|| NameIndex::from_image(black_box(image.clone())).expect("image"))
        });
    }
    g.finish();
}

fn answer(c: &mut Criterion) {
    let mut g = c.benchmark_group("answer_query");
    for n in [10, 1_000, 100_000] {
        let index = NameIndex::from_json(&table_json(n)).expect("table");
        let cases = [
            (
                "fqdn",
                query(&format!(
                    "svc{}.ns{}.svc.cluster.local",
                    n - 1,
                    (n - 1) % 100
                )),
            ),
            ("short", query(&format!("svc{}.ns{}", n - 1, (n - 1) % 100))),
            (
                "search",
                query(&format!(
                    "svc{}.ns{}.svc.cluster.local.svc.cluster.local",
                    n - 1,
                    (n - 1) % 100
                )),
            ),
            ("miss", query("www.example.org")),
        ];
        for (what, q) in &cases {
            g.bench_with_input(BenchmarkId::new(*what, n), q, |b, q| {
                b.iter(|| {
                    respond(
                        black_box(q),
                        Transport::Udp,
                        Some(&index),
                        "cluster.local",
                        0,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, compile, load_image, answer);
criterion_main!(benches);
