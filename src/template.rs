//! The subset of Go's `text/template` that Kuma's HostnameGenerator templates use:
//! text, `{{ .Field }}`, `{{ label "key" }}`, and `{{-`/`-}}` whitespace trimming.
//!
//! Parsed once per configuration; rendering is a walk over the parts.

use crate::model::Labels;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("unclosed action starting at byte {0}")]
    Unclosed(usize),
    #[error("unsupported action \"{{{{{0}}}}}\": only {{{{ .Name }}}}, {{{{ .DisplayName }}}}, {{{{ .Namespace }}}}, {{{{ .Mesh }}}}, {{{{ .Zone }}}} and {{{{ label \"key\" }}}} are supported")]
    Unsupported(String),
    #[error("can't evaluate field {0}: the fields are Name, DisplayName, Namespace, Mesh and Zone")]
    UnknownField(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("label {0} not found")]
    LabelNotFound(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    DisplayName,
    Namespace,
    Mesh,
    Zone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
    Label(String),
}

/// What a template can refer to, for one service.
#[derive(Debug, Clone, Copy)]
pub struct Values<'a> {
    pub name: &'a str,
    pub display_name: &'a str,
    pub namespace: &'a str,
    pub mesh: &'a str,
    pub zone: &'a str,
    pub labels: &'a Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        let mut trim_next_text = false;
        loop {
            let Some(open) = rest.find("{{") else {
                push_text(&mut parts, rest, trim_next_text, false);
                break;
            };
            let after_open = &rest[open + 2..];
            let trim_before = after_open.starts_with("- ");
            push_text(&mut parts, &rest[..open], trim_next_text, trim_before);
            let close = after_open.find("}}").ok_or(ParseError::Unclosed(offset + open))?;
            let mut body = &after_open[..close];
            if trim_before {
                body = &body[1..];
            }
            trim_next_text = body.ends_with(" -");
            if trim_next_text {
                body = &body[..body.len() - 1];
            }
            parts.push(parse_action(body.trim())?);
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        Ok(Self { parts })
    }

    pub fn render(&self, values: &Values<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(match f {
                    Field::Name => values.name,
                    Field::DisplayName => values.display_name,
                    Field::Namespace => values.namespace,
                    Field::Mesh => values.mesh,
                    Field::Zone => values.zone,
                }),
                Part::Label(key) => {
                    let value = values.labels.get(key).ok_or_else(|| RenderError::LabelNotFound(key.clone()))?;
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

fn push_text(parts: &mut Vec<Part>, text: &str, trim_start: bool, trim_end: bool) {
    let mut text = text;
    if trim_start {
        text = text.trim_start();
    }
    if trim_end {
        text = text.trim_end();
    }
    if !text.is_empty() {
        parts.push(Part::Text(text.to_string()));
    }
}

fn parse_action(body: &str) -> Result<Part, ParseError> {
    if let Some(field) = body.strip_prefix('.') {
        return match field {
            "Name" => Ok(Part::Field(Field::Name)),
            "DisplayName" => Ok(Part::Field(Field::DisplayName)),
            "Namespace" => Ok(Part::Field(Field::Namespace)),
            "Mesh" => Ok(Part::Field(Field::Mesh)),
            "Zone" => Ok(Part::Field(Field::Zone)),
            other if other.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !other.is_empty() => {
                Err(ParseError::UnknownField(other.to_string()))
            }
            _ => Err(ParseError::Unsupported(body.to_string())),
        };
    }
    let label_arg = body.strip_prefix("label").filter(|a| a.starts_with(char::is_whitespace));
    if let Some(arg) = label_arg.map(str::trim) {
        let quoted =
            [('"', '"'), ('`', '`')].into_iter().find_map(|(open, close)| arg.strip_prefix(open)?.strip_suffix(close));
        if let Some(key) = quoted.filter(|k| !k.contains(['"', '`', '\\'])) {
            return Ok(Part::Label(key.to_string()));
        }
    }
    Err(ParseError::Unsupported(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(labels: &Labels) -> Values<'_> {
        Values {
            name: "core-name",
            display_name: "httpbin",
            namespace: "kuma-demo",
            mesh: "default",
            zone: "east",
            labels,
        }
    }

    #[test]
    fn renders_every_field() {
        let labels = Labels::new();
        let cases = [
            ("{{ .Name }}", "core-name"),
            ("{{ .DisplayName }}.extsvc.mesh.local", "httpbin.extsvc.mesh.local"),
            ("{{.Namespace}}", "kuma-demo"),
            ("{{ .Mesh }}", "default"),
            ("{{ .Zone }}", "east"),
            ("a {{- .Mesh -}} b", "adefaultb"),
            ("a {{ .Mesh }} b", "a default b"),
            ("plain", "plain"),
        ];
        for (source, want) in cases {
            let t = Template::parse(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            assert_eq!(t.render(&values(&labels)).as_deref(), Ok(want), "{source}");
        }
    }

    #[test]
    fn label_hit_and_miss() {
        let mut labels = Labels::new();
        labels.insert("team".into(), "payments".into());
        let t = Template::parse(r#"{{ label "team" }}.{{ .Mesh }}"#).unwrap();
        assert_eq!(t.render(&values(&labels)).unwrap(), "payments.default");
        let t = Template::parse("{{ label `owner` }}").unwrap();
        assert_eq!(t.render(&values(&labels)), Err(RenderError::LabelNotFound("owner".into())));
        assert_eq!(RenderError::LabelNotFound("owner".into()).to_string(), "label owner not found");
    }

    #[test]
    fn rejects_other_actions() {
        for (source, want) in [
            ("{{ if .Name }}x{{ end }}", ParseError::Unsupported("if .Name".into())),
            ("{{ .Name | upper }}", ParseError::Unsupported(".Name | upper".into())),
            ("{{ .Unknown }}", ParseError::UnknownField("Unknown".into())),
            ("{{ label team }}", ParseError::Unsupported("label team".into())),
            ("{{ labelx \"a\" }}", ParseError::Unsupported("labelx \"a\"".into())),
            ("x{{ .Name", ParseError::Unclosed(1)),
        ] {
            assert_eq!(Template::parse(source), Err(want), "{source}");
        }
        let msg = ParseError::Unsupported("if .Name".into()).to_string();
        assert!(msg.starts_with("unsupported action \"{{if .Name}}\""), "{msg}");
    }
}
