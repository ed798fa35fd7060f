//! The chaos suite's figures as a Markdown table: `whist-devstack chaos-report DIR DOC` reads
//! the JSON file each scenario of `devstack/tests/chaos.rs` wrote and replaces the table
//! between the markers in DOC (`docs/reliability.md`), so the published figures are the last
//! run's, never typed by hand.

use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

pub const BEGIN: &str = "<!-- chaos:begin (written by `make chaos`; do not edit) -->";
pub const END: &str = "<!-- chaos:end -->";

/// Renders the table of every `*.json` in `dir`, sorted by scenario name.
pub fn render(dir: &Path) -> anyhow::Result<String> {
    let mut rows: Vec<Value> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            rows.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a scenario's JSON", path.display()))?,
            );
        }
    }
    anyhow::ensure!(!rows.is_empty(), "no scenario results in {}", dir.display());
    rows.sort_by(|a, b| a["scenario"].as_str().cmp(&b["scenario"].as_str()));
    let text = |v: &Value| match v {
        Value::String(s) => s.replace('|', "\\|"),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut out = String::from(
        "| scenario | what was done | form | requests sent | answered | succeeded | refused | recovery (s) | leaks | notes | run at |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            text(&row["scenario"]),
            text(&row["what"]),
            text(&row["form"]),
            text(&row["sent"]),
            text(&row["answered"]),
            text(&row["succeeded"]),
            text(&row["refused"]),
            text(&row["recovery_seconds"]),
            text(&row["leaks"]),
            text(&row["notes"]),
            text(&row["at"]),
        ));
    }
    Ok(out)
}

/// Replaces the table between [`BEGIN`] and [`END`] in `doc` (appending both when missing).
pub fn write(dir: &Path, doc: &Path) -> anyhow::Result<()> {
    let table = render(dir)?;
    let current = std::fs::read_to_string(doc).unwrap_or_default();
    let block = format!("{BEGIN}\n{table}{END}");
    let updated = match (current.find(BEGIN), current.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            format!(
                "{}{block}{}",
                &current[..begin],
                &current[end + END.len()..]
            )
        }
        _ => format!("{}\n## Scenarios\n\n{block}\n", current.trim_end()),
    };
    std::fs::write(doc, updated).with_context(|| format!("writing {}", doc.display()))?;
    println!(
        "wrote the figures of {} into {}",
        dir.display(),
        doc.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_replaces_only_what_lies_between_the_markers() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"scenario":"b","what":"x | y","sent":3,"answered":3,"leaks":0}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("a.json"), r#"{"scenario":"a","sent":1}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let doc = dir.path().join("doc.md");
        std::fs::write(&doc, format!("# T\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), &doc).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.starts_with("# T\n\nbefore\n"));
        assert!(text.ends_with(&format!("{END}\nafter\n")));
        assert!(!text.contains("old"));
        let a = text.find("| `a` |").unwrap_or(usize::MAX);
        let b = text.find("| `b` |").unwrap_or(0);
        assert!(a < b, "sorted by scenario: {text}");
        assert!(text.contains("x \\| y"), "pipes are escaped: {text}");
    }
}
