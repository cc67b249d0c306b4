//! The Kubernetes manifests (deploy/kubernetes) validate offline against a
//! current Kubernetes's schemas with unknown fields refused
//! (`kubernetes-validate --strict`, run by scripts/validate-kubernetes), and
//! the checks the schemas cannot make hold: every manifest is in the
//! kustomization and the grace period covers the drain. Each check is also
//! shown to fail on a manifest broken on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn validate(dir: &Path) -> Output {
    Command::new(common::repo().join("scripts/validate-kubernetes")).arg(dir).output().expect("run the validator")
}

/// A copy of deploy/kubernetes to break.
fn copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::repo().join("deploy/kubernetes")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn refused(out: &Output, why: &str) {
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && all.contains(why), "expected a refusal naming {why:?}: {all}");
}

#[test]
fn every_kubernetes_manifest_validates_strictly_and_the_drain_fits_the_grace_period() {
    let out = validate(&common::repo().join("deploy/kubernetes"));
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Every kind a cluster needs is there.
    let dir = common::repo().join("deploy/kubernetes");
    let all: String = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    for kind in
        ["kind: StatefulSet", "kind: Service", "clusterIP: None", "kind: PodDisruptionBudget", "secretGenerator"]
    {
        assert!(all.contains(kind), "no {kind}");
    }
    assert!(common::repo().join("Dockerfile").is_file());
}

#[test]
fn a_manifest_with_an_unknown_field_is_refused() {
    let dir = copy();
    edit(dir.path(), "statefulset.yaml", "  serviceName: kiln-peers", "  serviceName: kiln-peers\n  bogusField: 1");
    refused(&validate(dir.path()), "bogusField");
}

#[test]
fn a_grace_period_shorter_than_the_drain_is_refused() {
    let dir = copy();
    edit(dir.path(), "statefulset.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 20");
    refused(&validate(dir.path()), "terminationGracePeriodSeconds 20");
}

#[test]
fn a_manifest_the_kustomization_does_not_list_is_refused() {
    let dir = copy();
    std::fs::copy(dir.path().join("service.yaml"), dir.path().join("extra.yaml")).unwrap();
    refused(&validate(dir.path()), "extra.yaml");
}
