//! Docs that name tests name tests that exist: the security model's
//! boundaries each cite the test that proves them.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Whether `file` defines a function `name`.
fn defines(file: &Path, name: &str) -> bool {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .contains(&format!("fn {name}("))
}

#[test]
fn every_test_the_security_model_cites_exists() {
    let doc = std::fs::read_to_string(root().join("docs/security-model.md")).unwrap();
    let spans: Vec<&str> = doc.split('`').skip(1).step_by(2).collect();
    let mut cited = 0;
    for (i, span) in spans.iter().enumerate() {
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if let Some((module, name)) = span.split_once("::") {
            if ident(module) && ident(name) && name.len() > 20 {
                let file = root().join(format!("tests/tests/it/{module}.rs"));
                assert!(
                    defines(&file, name),
                    "security-model.md cites {span}, which does not exist"
                );
                cited += 1;
            }
        } else if span.ends_with(".rs") && span.contains('/') && !span.contains('<') {
            // `path/to/file.rs` `test_name`
            let name = spans.get(i + 1).expect("a test name after a path");
            assert!(
                defines(&root().join(span), name),
                "security-model.md cites {name} in {span}, which does not exist"
            );
            cited += 1;
        }
    }
    assert!(
        cited >= 30,
        "only {cited} citations found: the parser is broken"
    );
}
