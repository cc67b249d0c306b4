//! The Kubernetes manifests (deploy/kubernetes) validate offline against a
//! current Kubernetes's schemas with unknown fields refused
//! (`kubernetes-validate --strict`, run by scripts/validate-kubernetes), and
//! the checks the schemas cannot make hold: every manifest is in the
//! kustomization, the grace period covers the drain, and every `KILN_*`
//! variable the image and the manifests set is one kiln reads. Each check
//! is also shown to fail on a manifest broken on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
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

/// The `KILN_*` names in `text`.
fn kiln_variables(text: &str) -> BTreeSet<String> {
    text.match_indices("KILN_")
        .map(|(at, _)| {
            let name: String =
                text[at..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            name
        })
        .collect()
}

/// The variables the image's commands (`kiln serve`, and `kiln runtime
/// build` at image build time) read, from their `--help`; and `KILN_LOG`,
/// the log filter.
fn variables_kiln_reads() -> BTreeSet<String> {
    let mut read = BTreeSet::from(["KILN_LOG".to_string()]);
    for args in [&["serve", "--help"][..], &["runtime", "build", "--help"]] {
        let out = Command::new(common::kiln_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "kiln {args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        read.extend(
            help.split("[env: ").skip(1).flat_map(|after| kiln_variables(after.split(']').next().unwrap_or_default())),
        );
    }
    read
}

fn unread(text: &str, read: &BTreeSet<String>) -> Vec<String> {
    kiln_variables(text).into_iter().filter(|v| !read.contains(v)).collect()
}

#[test]
fn every_kiln_variable_the_image_and_the_manifests_set_is_one_kiln_reads() {
    let read = variables_kiln_reads();
    assert!(read.contains("KILN_ADVERTISE") && read.contains("KILN_DATABASE_URL"), "{read:?}");
    let repo = common::repo();
    let mut files = vec![repo.join("Dockerfile")];
    files.extend(std::fs::read_dir(repo.join("deploy/kubernetes")).unwrap().map(|e| e.unwrap().path()));
    let mut seen = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        seen += kiln_variables(&text).len();
        // A misspelt name would be ignored without a word, and the pod
        // would run on a default (say, listening on 127.0.0.1 only).
        assert_eq!(unread(&text, &read), Vec::<String>::new(), "{} sets variables kiln never reads", file.display());
    }
    assert!(seen >= 10, "only {seen} KILN_ variables found");
    // And a misspelling is caught.
    assert_eq!(unread("- name: KILN_ADVERTSE\n  value: x", &read), ["KILN_ADVERTSE"]);
}
