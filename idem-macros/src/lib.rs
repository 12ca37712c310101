//! The `#[idempotent]` attribute. Use it through the `idem` crate, whose documentation
//! describes the options; this crate only parses, validates and expands.

mod attr;
mod duration;
mod expand;
mod valid;

use proc_macro::TokenStream;

/// Makes an async function idempotent: its body runs at most once per key while the record
/// lives, and later calls get the first call's result. See the `idem` crate for the options.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
