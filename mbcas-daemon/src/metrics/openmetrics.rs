//! A strict checker for OpenMetrics text exposition (tests only).
//!
//! It accepts the subset of the OpenMetrics 1.0 text format that a conforming
//! exposition of counters, gauges, histograms and info metrics uses, and rejects
//! anything else with the line number: metadata after samples, interleaved
//! families, sample names that do not belong to their family's type, malformed
//! labels or escapes, duplicate series, non-cumulative histogram buckets, a count
//! that differs from the `+Inf` bucket, a missing or misplaced `# EOF`.

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub unit: Option<String>,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// The parsed exposition, families in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposition {
    pub families: Vec<Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The value of the sample `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Every sample named `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(move |s| s.name == name)
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.is_empty()
            || s.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("bad number {s:?}"))
        }
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad number {s:?}: {e}")),
    }
}

/// Parses `{a="b",c="d"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else {
        return Ok((labels, s));
    };
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value not terminated")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in label {name}: {other:?}")),
                },
                Some((_, '\n')) => return Err(format!("raw newline in label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest
            .strip_prefix(',')
            .ok_or_else(|| format!("expected ',' or '}}' after label {name}"))?;
    }
}

fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" => &[""],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
        }
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        "stateset" => &[""],
        _ => &[],
    }
}

/// Checks `text` and returns what it exposes, or `line N: what is wrong`.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("exposition does not end with '# EOF'")?;
    let mut families: Vec<Family> = Vec::new();
    let mut seen_families = HashSet::new();
    let mut seen_series = HashSet::new();
    for (i, line) in body.lines().enumerate() {
        let n = i + 1;
        let err = |m: String| format!("line {n}: {m}: {line:?}");
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (Some(what), Some(name)) = (parts.next(), parts.next()) else {
                return Err(err("short metadata line".into()));
            };
            let arg = parts.next();
            if !is_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            let fam = match families.last_mut() {
                Some(f) if f.name == name => {
                    if !f.samples.is_empty() {
                        return Err(err("metadata after samples".into()));
                    }
                    f
                }
                _ => {
                    if !seen_families.insert(name.to_owned()) {
                        return Err(err(format!("family {name} appears twice")));
                    }
                    families.push(Family {
                        name: name.to_owned(),
                        kind: "unknown".into(),
                        unit: None,
                        help: None,
                        samples: Vec::new(),
                    });
                    families.last_mut().ok_or("unreachable")?
                }
            };
            match (what, arg) {
                ("TYPE", Some(t)) => {
                    if suffixes(t).is_empty() {
                        return Err(err(format!("unknown type {t:?}")));
                    }
                    fam.kind = t.to_owned();
                }
                ("HELP", h) => fam.help = Some(h.unwrap_or("").to_owned()),
                ("UNIT", Some(u)) => {
                    if !name.ends_with(&format!("_{u}")) {
                        return Err(err(format!("name does not end with unit _{u}")));
                    }
                    fam.unit = Some(u.to_owned());
                }
                _ => return Err(err("unknown metadata".into())),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(err("comment that is not HELP/TYPE/UNIT/EOF".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("sample without value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(err)?;
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(err)?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let fam = families
            .last_mut()
            .ok_or_else(|| err("sample before any metadata".into()))?;
        let suffix = name
            .strip_prefix(fam.name.as_str())
            .ok_or_else(|| err(format!("sample not in family {}", fam.name)))?;
        if !suffixes(&fam.kind).contains(&suffix) {
            return Err(err(format!(
                "suffix {suffix:?} not allowed for a {}",
                fam.kind
            )));
        }
        if (suffix == "_total" || suffix == "_count" || suffix == "_bucket")
            && (value.is_nan() || value < 0.0)
        {
            return Err(err("counter-like value is negative or NaN".into()));
        }
        if suffix == "_bucket" && !labels.contains_key("le") {
            return Err(err("bucket without le".into()));
        }
        if !seen_series.insert(format!("{name}{labels:?}")) {
            return Err(err("duplicate series".into()));
        }
        fam.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    for fam in &families {
        if fam.kind == "histogram" {
            check_histogram(fam)?;
        }
    }
    Ok(Exposition { families })
}

fn check_histogram(fam: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for s in &fam.samples {
        let mut rest = s.labels.clone();
        let le = rest.remove("le");
        let key = format!("{rest:?}");
        if s.name.ends_with("_bucket") {
            let le = parse_value(le.as_deref().unwrap_or(""))
                .map_err(|e| format!("{}: le: {e}", fam.name))?;
            groups.entry(key).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(key, s.value);
        }
    }
    for (key, buckets) in &groups {
        for w in buckets.windows(2) {
            if !(w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
                return Err(format!(
                    "{} {key}: buckets not cumulative/ascending",
                    fam.name
                ));
            }
        }
        let last = buckets.last().ok_or("no buckets")?;
        if last.0 != f64::INFINITY {
            return Err(format!("{} {key}: last bucket is not +Inf", fam.name));
        }
        if counts.get(key) != Some(&last.1) {
            return Err(format!(
                "{} {key}: _count differs from the +Inf bucket",
                fam.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn accepts_a_valid_exposition() {
        let text = "# HELP a_seconds A.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
            a_seconds_sum 1.5\na_seconds_count 2\na_seconds_bucket{le=\"1.0\"} 1\na_seconds_bucket{le=\"+Inf\"} 2\n\
            # TYPE b counter\nb_total{x=\"q\\\"\\\\\\n\"} 3\n# EOF\n";
        let e = parse(text).unwrap();
        assert_eq!(e.value("b_total", &[("x", "q\"\\\n")]), Some(3.0));
        assert_eq!(e.family("a_seconds").map(|f| f.samples.len()), Some(4));
    }

    #[test]
    fn rejects_broken_expositions() {
        let bad = [
            ("# TYPE b counter\nb_total 1\n", "EOF"),
            ("# TYPE b counter\nb 1\n# EOF\n", "suffix"),
            (
                "# TYPE b gauge\nb{x=\"1\",x=\"2\"} 1\n# EOF\n",
                "duplicate label",
            ),
            ("# TYPE b gauge\nb{x=1} 1\n# EOF\n", "not quoted"),
            ("# TYPE b gauge\nb{x=\"\\t\"} 1\n# EOF\n", "escape"),
            ("# TYPE b gauge\nb 1\nb 2\n# EOF\n", "duplicate series"),
            ("# TYPE b gauge\nb one\n# EOF\n", "bad number"),
            (
                "# TYPE b gauge\nb 1\n# HELP b x\n# EOF\n",
                "metadata after samples",
            ),
            (
                "# TYPE b gauge\n# TYPE c gauge\n# TYPE b gauge\n# EOF\n",
                "twice",
            ),
            ("# TYPE b_x gauge\n# UNIT b_x seconds\n# EOF\n", "unit"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
                "cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n# EOF\n",
                "_count",
            ),
            ("# TYPE b gauge\n\nb 1\n# EOF\n", "empty line"),
            ("b 1\n# EOF\n", "before any metadata"),
        ];
        for (text, want) in bad {
            match parse(text) {
                Ok(_) => panic!("accepted {text:?}"),
                Err(e) => assert!(e.contains(want), "{text:?}: {e} (wanted {want})"),
            }
        }
    }
}
