//! Micro benchmarks of translation and encoding on the generated S topology (1,000 services x 10
//! endpoints over two clusters): one ClusterLoadAssignment, a full CDS, the canonical encoding of one
//! resource (`Resource::encode`: canonical `Any` bytes + content hash), and SotW / Delta response
//! envelopes around 1,000 shared assignments.
//!
//! `cargo bench --bench xds`; `cargo bench --bench xds -- --test` runs each once (the smoke mode).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use meshfed::cache::Resource;
use meshfed::model::ServiceKey;
use meshfed::registry::Registry;
use meshfed::translate::{self, Context, Named, View};
use meshfed::xds::codec::{DeltaResponse, Response, SotwResponse};
use meshfed_load::server::mesh_config;
use meshfed_load::topo::{ProxyIdentity, Size, Topology, proxy_node};

struct Fixture {
    registry: Registry,
    ctx: Context,
    view: View,
    clas: Vec<Arc<Resource>>,
}

fn fixture() -> Fixture {
    let topology = Topology::new(Size::S);
    let mesh = mesh_config(&topology, "0ms", "0ms").expect("mesh config");
    let mut registry = Registry::new(&mesh);
    for e in topology.initial_events() {
        registry.apply(e);
    }
    let ctx = Context::from_mesh(&mesh).with_registry(&registry);
    let proxy = meshfed::proxy::Proxy::from_node(Some(&proxy_node(0, &ProxyIdentity::default()))).expect("node");
    let view = View::of(&proxy, &registry);
    let clas = registry
        .services()
        .values()
        .flat_map(|s| translate::endpoint::service_load_assignments(&ctx, &view.endpoints, s))
        .map(Resource::encode)
        .collect();
    Fixture { registry, ctx, view, clas }
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let key = ServiceKey::new("shop", "svc-00042");
    let service = f.registry.service(&key).expect("service exists").clone();

    c.bench_function("translate/cla_one_service", |b| {
        b.iter(|| translate::endpoint::service_load_assignments(&f.ctx, black_box(&f.view.endpoints), &service))
    });
    c.bench_function("translate/cds_full_S", |b| {
        b.iter(|| translate::cluster::clusters(&f.ctx, black_box(&f.view.clusters), &f.registry))
    });
    let cla = translate::endpoint::service_load_assignments(&f.ctx, &f.view.endpoints, &service).remove(0);
    c.bench_function("encode/resource_cla", |b| {
        b.iter(|| {
            Resource::encode(Named {
                name: cla.name.clone(),
                resource: black_box(cla.resource.clone()),
                wildcard: true,
            })
        })
    });
    let cluster = translate::cluster::clusters(&f.ctx, &f.view.clusters, &f.registry).remove(5);
    c.bench_function("encode/resource_cluster", |b| {
        b.iter(|| {
            Resource::encode(Named {
                name: cluster.name.clone(),
                resource: black_box(cluster.resource.clone()),
                wildcard: true,
            })
        })
    });
    let sotw = Response::Sotw(SotwResponse {
        version_info: "0123456789abcdef".into(),
        type_url: meshfed::type_url::ENDPOINT,
        nonce: "42".into(),
        resources: f.clas.clone().into(),
    });
    let delta = Response::Delta(DeltaResponse {
        system_version_info: String::new(),
        type_url: meshfed::type_url::ENDPOINT,
        nonce: "42".into(),
        resources: f.clas.clone().into(),
        removed_resources: Vec::new(),
    });
    c.bench_function("response/sotw_eds_1000", |b| b.iter(|| black_box(&sotw).encode_to_vec()));
    c.bench_function("response/delta_eds_1000", |b| b.iter(|| black_box(&delta).encode_to_vec()));
    let one = Response::Sotw(SotwResponse {
        version_info: "0123456789abcdef".into(),
        type_url: meshfed::type_url::ENDPOINT,
        nonce: "43".into(),
        resources: vec![f.clas[42].clone()].into(),
    });
    c.bench_function("response/sotw_eds_1", |b| b.iter(|| black_box(&one).encode_to_vec()));
}

criterion_group!(xds, benches);
criterion_main!(xds);
