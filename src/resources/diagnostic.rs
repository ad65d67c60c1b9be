//! Errors and warnings about the input, each naming the file, line and field path.

use std::fmt;
use std::path::Path;

use super::Origin;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: Option<usize>,
    /// The resource the message is about, as `Kind mesh/name`, when known.
    pub resource: Option<String>,
    /// Field path such as `spec.match.port`; empty for file-level problems.
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn error(origin: &Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, origin, path, message)
    }

    pub fn warning(origin: &Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, origin, path, message)
    }

    pub fn file_error(file: &Path, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: file.display().to_string(),
            line: None,
            resource: None,
            path: String::new(),
            message: message.into(),
        }
    }

    fn new(severity: Severity, origin: &Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity,
            file: origin.file.display().to_string(),
            line: origin.line,
            resource: None,
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn about(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(resource) = &self.resource {
            write!(f, ": {resource}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All diagnostics of one load, in the order they were found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn extend(&mut self, other: impl IntoIterator<Item = Diagnostic>) {
        self.0.extend(other);
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}
