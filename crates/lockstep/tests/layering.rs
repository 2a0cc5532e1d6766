//! DESIGN.md's "must not know about" column, enforced: each crate may
//! depend only on the workspace crates below it.

use std::collections::BTreeMap;
use std::process::Command;

/// Workspace crates each crate may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("rv", &[]),
    ("machine", &["rv"]),
    ("tap", &[]),
    ("replay", &["rv"]),
    ("ft", &["rv", "machine", "replay", "tap"]),
    ("lab", &[]),
    ("lockstep", &["rv", "machine", "replay", "ft", "tap", "lab"]),
];

#[test]
fn crates_depend_only_downwards() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = meta["packages"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    for pkg in meta["packages"].as_array().unwrap() {
        let name = pkg["name"].as_str().unwrap();
        let ok = allowed.get(name).unwrap_or_else(|| panic!("crate '{name}' is not in the layer table"));
        for dep in pkg["dependencies"].as_array().unwrap() {
            let dep = dep["name"].as_str().unwrap();
            if members.contains(&dep) {
                assert!(ok.contains(&dep), "'{name}' must not depend on '{dep}' (see DESIGN.md's layer table)");
            }
        }
    }
}
