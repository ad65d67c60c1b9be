//! MeshExternalService extensions: Rust types registered by their `spec.extension.type` name.
//!
//! A service naming a type that is not registered loads as broken with that reason; the other
//! services are not affected.

use std::collections::HashMap;
use std::sync::Arc;

use serde_norway::Value;

pub trait Extension: Send + Sync {
    /// Checks `spec.extension.config`; the error says what is wrong.
    fn validate(&self, config: Option<&Value>) -> Result<(), String>;
}

#[derive(Default, Clone)]
pub struct Registry {
    types: HashMap<String, Arc<dyn Extension>>,
}

impl Registry {
    pub fn register(&mut self, type_name: impl Into<String>, extension: Arc<dyn Extension>) {
        self.types.insert(type_name.into(), extension);
    }

    /// Why a service with this extension cannot be served, if it cannot.
    pub fn check(&self, type_name: &str, config: Option<&Value>) -> Result<(), String> {
        match self.types.get(type_name) {
            None => Err(format!("extension type '{type_name}' is not registered in this build of mesh-egress")),
            Some(ext) => ext.validate(config).map_err(|e| format!("extension '{type_name}': {e}")),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.types.keys()).finish()
    }
}
