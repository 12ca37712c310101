//! The `#[idempotent]` attribute. Use it through the `idem` crate, whose documentation
//! describes the options; this crate only parses, validates and expands.

mod attr;
mod derive;
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

/// Implements `idem::KeyPart` for a struct or enum from its fields, so it can be a key, part of
/// one, or a default-key argument. See `idem::KeyPart` for the encoding and the `#[key(...)]`
/// options.
#[proc_macro_derive(KeyPart, attributes(key))]
pub fn derive_key_part(input: TokenStream) -> TokenStream {
    derive::key_part(input.into()).into()
}
