//! A reference a fuzz harness holds, borrowed or owned; shared by the
//! fuzz crates (`fuzz/shuttle` includes this file by path).

use percpu_ref::{OwnedRef, Ref, ReleasePolicy};

/// A held reference to the harness's `u64`.
#[derive(Debug)]
pub enum Held<'a, P: ReleasePolicy<u64>> {
    /// From `tryget`/`tryget_live`/`Ref::from_raw`.
    B(Ref<'a, u64, P>),
    /// From `tryget_owned`/`tryget_live_owned`/`OwnedRef::from_raw`.
    O(OwnedRef<u64, P>),
}

impl<P: ReleasePolicy<u64>> Held<'_, P> {
    /// The value it refers to.
    pub fn value(&self) -> u64 {
        match self {
            Held::B(r) => **r,
            Held::O(r) => **r,
        }
    }
}

impl<P: ReleasePolicy<u64>> Clone for Held<'_, P> {
    fn clone(&self) -> Self {
        match self {
            Held::B(r) => Held::B(r.clone()),
            Held::O(r) => Held::O(r.clone()),
        }
    }
}
