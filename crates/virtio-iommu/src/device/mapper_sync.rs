//! Mirroring a domain's mappings into external mappers, in steps that are undone in reverse
//! when one fails, so a refused request leaves a mapper as it was.

use std::sync::Arc;

use vm_device::{error_limited, warn_limited};

use super::Endpoint;
use crate::mapper::{ExternalMapper, MapPerms, MapperError};
use crate::protocol::Status;
use crate::table::{Mapping, MappingTable, PERM_READ, PERM_WRITE};
pub(super) fn mapper_status(e: &MapperError) -> Status {
    match e {
        MapperError::NoResources => Status::NoMem,
        MapperError::Failed(_) => Status::DevErr,
    }
}

pub(super) fn map_perms(perms: u8) -> MapPerms {
    MapPerms {
        read: perms & PERM_READ != 0,
        write: perms & PERM_WRITE != 0,
    }
}

/// Map `m` into each mapper; on failure undo the ones already done.
pub(super) fn mappers_map(
    mappers: &[(Arc<dyn ExternalMapper>, usize)],
    m: &Mapping,
) -> Result<(), Status> {
    for (i, (mapper, _)) in mappers.iter().enumerate() {
        if let Err(e) = mapper.map(m.start, m.phys, m.size(), map_perms(m.perms)) {
            warn_limited!(
                "external mapper MAP {:#x}+{:#x} failed: {e}",
                m.start,
                m.size()
            );
            for (done, _) in &mappers[..i] {
                if let Err(e) = done.unmap(m.start, m.size()) {
                    error_limited!("rollback unmap {:#x} failed: {e}", m.start);
                }
            }
            return Err(mapper_status(&e));
        }
    }
    Ok(())
}

/// Replay every mapping of `table` into `mapper`; on failure undo what was replayed.
fn replay(table: &MappingTable, mapper: &dyn ExternalMapper) -> Result<(), Status> {
    let mut done: Vec<Mapping> = Vec::new();
    for m in table.iter() {
        if let Err(e) = mapper.map(m.start, m.phys, m.size(), map_perms(m.perms)) {
            warn_limited!("external mapper replay of {:#x} failed: {e}", m.start);
            unreplay(&done, mapper);
            return Err(mapper_status(&e));
        }
        done.push(m);
    }
    Ok(())
}

/// Unmap `mappings` from `mapper` during a rollback; failures can only be logged.
fn unreplay(mappings: &[Mapping], mapper: &dyn ExternalMapper) {
    for m in mappings {
        if let Err(e) = mapper.unmap(m.start, m.size()) {
            error_limited!("rollback unmap {:#x} failed: {e}", m.start);
        }
    }
}

/// Remove every mapping of `table` from `mapper`; on failure re-map what was removed.
fn withdraw(table: &MappingTable, mapper: &dyn ExternalMapper) -> Result<(), Status> {
    let mut done: Vec<Mapping> = Vec::new();
    for m in table.iter() {
        if let Err(e) = mapper.unmap(m.start, m.size()) {
            warn_limited!("external mapper unmap of {:#x} failed: {e}", m.start);
            for d in &done {
                if let Err(e) = mapper.map(d.start, d.phys, d.size(), map_perms(d.perms)) {
                    error_limited!("rollback map {:#x} failed: {e}", d.start);
                }
            }
            return Err(mapper_status(&e));
        }
        done.push(m);
    }
    Ok(())
}

/// One reversible piece of mapper work.
pub(super) enum Step<'a> {
    Withdraw(&'a MappingTable),
    Identity(bool),
    Replay(&'a MappingTable),
}

fn apply(m: &dyn ExternalMapper, step: &Step) -> Result<(), Status> {
    match step {
        Step::Withdraw(t) => withdraw(t, m),
        Step::Identity(on) => m.set_identity(*on).map_err(|e| {
            warn_limited!("external mapper identity={on} failed: {e}");
            mapper_status(&e)
        }),
        Step::Replay(t) => replay(t, m),
    }
}

fn revert(m: &dyn ExternalMapper, step: &Step) {
    let undone = match step {
        Step::Withdraw(t) => replay(t, m),
        Step::Identity(on) => m.set_identity(!on).map_err(|e| mapper_status(&e)),
        Step::Replay(t) => withdraw(t, m),
    };
    if undone.is_err() {
        error_limited!("external mapper rollback failed; its mappings no longer match the domain");
    }
}

/// Run steps in order; on failure undo the completed ones (each step already undoes its own
/// partial progress), so the mapper ends as it started.
pub(super) fn run_steps(m: &dyn ExternalMapper, steps: &[Step]) -> Result<(), Status> {
    for (i, step) in steps.iter().enumerate() {
        if let Err(s) = apply(m, step) {
            for done in steps[..i].iter().rev() {
                revert(m, done);
            }
            return Err(s);
        }
    }
    Ok(())
}

/// How many times a device reset asks a mapper to withdraw a domain before it forces the
/// endpoint out and keeps the refused mappings as its leftover.
pub(crate) const WITHDRAW_ATTEMPTS: usize = 3;

/// Retry withdrawing endpoint `id`'s leftover mappings (those of a domain it was forced out
/// of), keeping the ones still refused; whether none is left. Not transactional: what the
/// mapper lets go of is gone, and the rest is what the host still holds.
pub(super) fn withdraw_leftover(id: u32, ep: &mut Endpoint) -> bool {
    let Some(mapper) = ep.mapper.as_ref() else {
        return true;
    };
    ep.leftover
        .retain(|m| mapper.unmap(m.start, m.size()).is_err());
    if !ep.leftover.is_empty() {
        warn_limited!(
            "endpoint {id:#x}: external mapper still refuses to withdraw {} mappings",
            ep.leftover.len()
        );
    }
    ep.leftover.is_empty()
}

/// Bring an unattached endpoint's mapper to what the model says of it: no leftover mappings,
/// and the identity map exactly when the global `bypass` is on (never while leftovers remain,
/// as identity and domain mappings never coexist in a mapper). Failures are logged; the
/// endpoint's fields keep telling what the mapper holds.
pub(super) fn settle_unattached(id: u32, ep: &mut Endpoint, bypass: bool) {
    if !withdraw_leftover(id, ep) || ep.identity == bypass {
        return;
    }
    if let Some(m) = ep.mapper.as_ref() {
        match m.set_identity(bypass) {
            Ok(()) => ep.identity = bypass,
            Err(e) => error_limited!("endpoint {id:#x}: identity={bypass} failed: {e}"),
        }
    }
}
