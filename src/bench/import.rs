//! `--mode import`: rebuilding a replica from an export, with and without
//! the index files an export carries since format 3.
//!
//! Builds one replica in process (`--n` clustered `--dim` vectors, L2, in
//! batches of `--batch`, sealed every `--seal-rows`, default 50,000; HNSW
//! `--m` / `--ef-construction`), waits for its indexes, and exports it
//! twice: once as it is, once after its index files were removed (what an
//! export without them gives the importer). Each export is then imported
//! into a fresh engine, alternating, `--trials` times each, timing the
//! import and the time until every sealed segment is searchable through
//! its index, with this process's CPU seconds over both.

use edgevec_engine::{ReplicaKey, ReplicaSpec, ShardOp};
use edgevec_proto::IndexSpec;

use super::*;

pub fn run(args: &Args, dir: &Path) -> Result<()> {
    let spec = ReplicaSpec {
        key: ReplicaKey {
            collection: 1,
            shard: 0,
        },
        name: "bench".into(),
        dim: args.dim as u32,
        metric: Metric::L2,
        seal_rows: args.seal_rows(50_000),
        index: IndexSpec {
            m: args.m as u32,
            ef_construction: args.ef_construction as u32,
        },
        fields: Vec::new(),
    };
    let data = engine::clustered(args.n, args.dim, args.clusters, 1, Metric::L2);
    let source = dir.join("source");
    let _ = std::fs::remove_dir_all(&source);
    let (with, without) = (dir.join("with-indexes.export"), dir.join("without-indexes.export"));
    let (segments, build_s) = {
        let engine = Engine::open(&source, EngineOptions::default())?;
        let replica = engine.create_replica(spec.clone())?;
        let mut prev = OpId::ZERO;
        for points in engine::batches(&data, args.batch) {
            let id = OpId::new(1, prev.lsn + 1);
            replica.append(prev, [(id, ShardOp::Upsert(points))])?;
            replica.apply_through(id.lsn)?;
            prev = id;
        }
        replica.flush()?;
        if !engine.wait_for_indexes(Duration::from_secs(3600)) {
            bail!("indexes not built within an hour");
        }
        let (_, builds, build_s) = engine.index_builds();
        replica.export_to(&with, &[])?;
        for entry in std::fs::read_dir(source.join("replicas/1-0"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "hnsw") {
                std::fs::remove_file(&path)?;
            }
        }
        replica.export_to(&without, &[])?;
        (builds, build_s)
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6);
    println!("### Rebuilding a replica from an export\n");
    println!("{}\n", usage::machine_line());
    println!(
        "One replica of {} × {} clustered vectors (L2), sealed every {} rows: {segments} sealed segments, \
         whose indexes (M {}, ef_construction {}) took {build_s:.1} s of build time. \
         Exports: {:.1} MB with the index files, {:.1} MB without.\n",
        args.n,
        args.dim,
        spec.seal_rows,
        args.m,
        args.ef_construction,
        size(&with)?,
        size(&without)?
    );
    println!("| export | trial | import s | until indexed s | index builds | process CPU s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for trial in 1..=args.trials.max(1) {
        for (name, file) in [("with index files", &with), ("without", &without)] {
            let root = dir.join(format!("import-{trial}-{}", name.len()));
            let _ = std::fs::remove_dir_all(&root);
            let engine = Engine::open(&root, EngineOptions::default())?;
            let cpu = usage::cpu_secs("self").unwrap_or(0.0);
            let t = Instant::now();
            engine.import_replica(spec.clone(), file)?;
            let import_s = t.elapsed().as_secs_f64();
            if !engine.wait_for_indexes(Duration::from_secs(3600)) {
                bail!("indexes not ready within an hour after the import");
            }
            let ready_s = t.elapsed().as_secs_f64();
            let cpu = usage::cpu_secs("self").unwrap_or(0.0) - cpu;
            let (_, builds, _) = engine.index_builds();
            println!("| {name} | {trial} | {import_s:.2} | {ready_s:.2} | {builds} | {cpu:.1} |");
            drop(engine);
            std::fs::remove_dir_all(&root)?;
        }
    }
    Ok(())
}
