//! Who may use what: the caller's API key, and the base or adapter(s) a request names
//! (`model`, `adapter`, or a weighted `adapters` stack), looked up in the registry.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};

use super::error::ApiError;
use super::state::AppState;
use crate::api::StackedAdapter;
use crate::auth::Grant;
use crate::registry::{validate_id, AdapterLease};

/// The most adapters one request may stack.
const MAX_STACKED: usize = 8;

impl AppState {
    /// The grant of the caller; `None` when the server has no keys (everything allowed).
    pub(super) fn authorize(&self, headers: &HeaderMap) -> Result<Option<&Grant>, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let header = headers.get("authorization").and_then(|v| v.to_str().ok());
        keys.check(header).map(Some).ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or invalid API key (Authorization: Bearer <key>)".into(),
            )
        })
    }

    pub(super) fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.authorize(headers)? {
            Some(g) if !g.is_admin() => Err(ApiError(
                StatusCode::FORBIDDEN,
                "managing adapters needs a \"*\" key".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The adapter a request asks for: `model` names an adapter, or the base (or is absent)
    /// with an optional `adapter` field.
    fn resolve(
        &self,
        grant: Option<&Grant>,
        model: Option<&str>,
        adapter: Option<&str>,
    ) -> Result<(String, Option<AdapterLease>), ApiError> {
        let id = match model {
            None => adapter,
            Some(model) if model == self.base_name => adapter,
            Some(model) => {
                if adapter.is_some_and(|a| a != model) {
                    return Err(ApiError::bad(format!(
                        "`model` {model:?} and `adapter` {:?} disagree",
                        adapter.unwrap_or_default()
                    )));
                }
                Some(model)
            }
        };
        let name = id.unwrap_or(&self.base_name).to_string();
        if grant.is_some_and(|g| !g.allows(&name)) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("this API key may not use {name:?}"),
            ));
        }
        match id {
            None => Ok((name, None)),
            Some(id) => {
                validate_id(id)?;
                Ok((name, Some(self.registry.get(id)?)))
            }
        }
    }

    /// The adapters a request asks for with their weights: the stack in `adapters` (over the
    /// base), or the one adapter [`Self::resolve`] finds.
    fn resolve_stack(
        &self,
        grant: Option<&Grant>,
        model: Option<&str>,
        adapter: Option<&str>,
        stack: Option<&[StackedAdapter]>,
    ) -> Result<(String, Vec<(AdapterLease, f64)>), ApiError> {
        let Some(stack) = stack else {
            let (name, one) = self.resolve(grant, model, adapter)?;
            return Ok((name, one.into_iter().map(|a| (a, 1.0)).collect()));
        };
        if model.is_some_and(|m| m != self.base_name) || adapter.is_some() {
            return Err(ApiError::bad(format!(
                "`adapters` stacks adapters over the base: `model` must be {:?} or absent, without `adapter`",
                self.base_name
            )));
        }
        if stack.is_empty() || stack.len() > MAX_STACKED {
            return Err(ApiError::bad(format!(
                "`adapters` takes 1 to {MAX_STACKED} adapters"
            )));
        }
        let mut adapters = Vec::with_capacity(stack.len());
        for s in stack {
            if !s.weight.is_finite() {
                return Err(ApiError::bad(format!(
                    "`adapters`: the weight of {:?} must be a finite number",
                    s.name
                )));
            }
            match self.resolve(grant, Some(&s.name), None)? {
                (_, Some(a)) => adapters.push((a, s.weight)),
                (_, None) => {
                    return Err(ApiError::bad(
                        "`adapters` names adapters; the base is always there",
                    ))
                }
            }
        }
        let reweighted = adapters.len() > 1 || adapters[0].1 != 1.0;
        let dora = |a: &AdapterLease| a.adapter().modules.values().any(|m| m.magnitude.is_some());
        if let Some((s, _)) = stack
            .iter()
            .zip(&adapters)
            .find(|(_, (a, _))| reweighted && dora(a))
        {
            let name = &s.name;
            return Err(ApiError::bad(format!(
                "`adapters`: {name:?} is a DoRA adapter, which cannot be stacked with others or re-weighted"
            )));
        }
        Ok((self.base_name.clone(), adapters))
    }

    /// [`Self::resolve_stack`] on a blocking thread: an adapter used for the first time is
    /// read from disk, or fetched from object storage.
    pub(super) async fn lookup(
        self: &Arc<Self>,
        grant: Option<&Grant>,
        model: Option<&str>,
        adapter: Option<&str>,
        stack: Option<&[StackedAdapter]>,
    ) -> Result<(String, Vec<(AdapterLease, f64)>), ApiError> {
        let state = self.clone();
        let grant = grant.cloned();
        let model = model.map(String::from);
        let adapter = adapter.map(String::from);
        let stack = stack.map(<[_]>::to_vec);
        tokio::task::spawn_blocking(move || {
            state.resolve_stack(
                grant.as_ref(),
                model.as_deref(),
                adapter.as_deref(),
                stack.as_deref(),
            )
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }
}
