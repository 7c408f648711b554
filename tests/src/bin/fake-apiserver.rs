//! Runs the fake Kubernetes API server by hand, for poking at the daemon or
//! kubectl against it:
//!
//! ```sh
//! fake-apiserver [--port N] [--kubeconfig-out PATH] [--seed FILE.json|FILE.yaml]
//! ```
//!
//! `--seed` preloads objects: a JSON array, a `v1 List`, or YAML documents
//! separated by `---`. Serves until Ctrl-C.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{bail, Context, Result};
use polarstack_tests::fake_api::FakeApi;
use serde::Deserialize;
use serde_json::Value;

struct Args {
    port: u16,
    kubeconfig_out: Option<PathBuf>,
    seed: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { port: 0, kubeconfig_out: None, seed: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => args.port = value()?.parse().context("--port")?,
            "--kubeconfig-out" => args.kubeconfig_out = Some(value()?.into()),
            "--seed" => args.seed = Some(value()?.into()),
            "-h" | "--help" => {
                println!("fake-apiserver [--port N] [--kubeconfig-out PATH] [--seed FILE.json|FILE.yaml]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// The objects of a seed file: a JSON array, a List, or YAML documents.
fn seed_objects(path: &PathBuf) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).with_context(|| format!("parse {}", path.display()))?;
        docs.push(v);
    }
    let mut objects = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            Value::Array(items) => objects.extend(items),
            Value::Object(ref m) if m.get("items").is_some_and(Value::is_array) => {
                objects.extend(m["items"].as_array().cloned().unwrap_or_default())
            }
            other => objects.push(other),
        }
    }
    Ok(objects)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let api = FakeApi::start_on(SocketAddr::from(([127, 0, 0, 1], args.port))).context("start the fake API server")?;
    if let Some(seed) = &args.seed {
        let objects = seed_objects(seed)?;
        let n = objects.len();
        for obj in objects {
            api.try_put(obj).with_context(|| format!("seed {}", seed.display()))?;
        }
        eprintln!("fake-apiserver: seeded {n} objects from {}", seed.display());
    }
    let kubeconfig = match &args.kubeconfig_out {
        Some(path) => {
            api.write_kubeconfig(path).with_context(|| format!("write {}", path.display()))?;
            path.clone()
        }
        None => api.kubeconfig_path().to_path_buf(),
    };
    println!("url: {}", api.url());
    println!("kubeconfig: {}", kubeconfig.display());
    println!("try: kubectl --kubeconfig {} get ns", kubeconfig.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(tokio::signal::ctrl_c()).context("wait for Ctrl-C")?;
    eprintln!("fake-apiserver: {} requests served, stopping", api.requests().len());
    Ok(())
}
