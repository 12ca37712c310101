//! Writes the expansion: the body moves into an async block handed to one generic runtime
//! function, so each annotated function adds a few lines, not a copy of the executor.

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{AttrStyle, Attribute, ItemFn, TraitItemFn};

use crate::attr::{Args, DurationArg, OnConflict};
use crate::valid::{self, Checked};

pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(err) => {
            // A signature without a body (in a trait, or an extern block) gets its own message.
            let err = match syn::parse2::<TraitItemFn>(item.clone()) {
                Ok(decl) if decl.default.is_none() => syn::Error::new(
                    decl.sig.span(),
                    "`#[idempotent]` needs a function with a body; in a trait, put it on the method of each `impl` instead of the declaration",
                ),
                _ => err,
            };
            let error = err.into_compile_error();
            return quote!(#error #item);
        }
    };
    // Parsing the options never fails as a whole: each mistake is kept in `args.errors`.
    let mut args: Args = match syn::parse2(args) {
        Ok(args) => args,
        Err(err) => {
            let mut args = Args::default();
            args.errors.push(err);
            args
        }
    };
    let mut errors = std::mem::take(&mut args.errors);
    let checked = valid::check(&args, &func, &mut errors);
    match (errors.finish(), checked) {
        (Ok(()), Some(checked)) => expand(&args, &func, &checked),
        (result, _) => {
            // Emit the function unchanged beside the errors, so its callers still type-check and
            // the only errors shown are the ones that matter.
            let error = result
                .err()
                .map(syn::Error::into_compile_error)
                .unwrap_or_default();
            // A function that returns an `Outcome` has a body that returns `Result<T, E>`: its
            // body is left out, so that the only errors are the ones above.
            if valid::idem_outcome(&func.sig.output).is_some() {
                let ItemFn {
                    attrs, vis, sig, ..
                } = &func;
                let outer = attrs
                    .iter()
                    .filter(|attr| matches!(attr.style, AttrStyle::Outer));
                return quote! {
                    #error
                    #(#outer)*
                    #[allow(unused_variables)]
                    #vis #sig { ::core::unimplemented!() }
                };
            }
            quote!(#error #func)
        }
    }
}

/// This crate's release, `[major, minor, patch]`, which the expansion asks the runtime to match.
pub(crate) const VERSION: [u64; 3] = [
    version_part(env!("CARGO_PKG_VERSION"), 0),
    version_part(env!("CARGO_PKG_VERSION"), 1),
    version_part(env!("CARGO_PKG_VERSION"), 2),
];

/// Part `index` of a `MAJOR.MINOR.PATCH[-pre][+build]` version (as `__private::version_part`).
const fn version_part(version: &str, index: usize) -> u64 {
    let bytes = version.as_bytes();
    let mut part = 0;
    let mut value = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'.' {
            if part == index {
                return value;
            }
            part += 1;
            value = 0;
        } else if b.is_ascii_digit() {
            value = value * 10 + (b - b'0') as u64;
        } else {
            break;
        }
        i += 1;
    }
    if part == index { value } else { 0 }
}

fn duration(krate: &TokenStream, arg: Option<&DurationArg>, default: TokenStream) -> TokenStream {
    match arg {
        Some(DurationArg::Nanos(n)) => quote!(#krate::__private::nanos(#n)),
        Some(DurationArg::Expr(expr)) => {
            quote_spanned!(expr.span()=> ::core::convert::identity::<::core::time::Duration>(#expr))
        }
        None => default,
    }
}

/// The path of the `idem` crate; the default `::idem` takes `span`, so that a bound of an item
/// named through it is reported where the caller of this function wants it.
fn krate_at(args: &Args, span: Span) -> TokenStream {
    match &args.krate {
        Some(path) => quote!(#path),
        None => quote_spanned!(span=> ::idem),
    }
}

fn expand(args: &Args, func: &ItemFn, checked: &Checked) -> TokenStream {
    let krate = krate_at(args, Span::call_site());
    // The expansion's own locals resolve at the macro's definition site (`mixed_site`): user
    // code can neither see them (an argument named `__idem_key` is the argument in the body and
    // in `key = ...`) nor shadow them. `at` only says where a diagnostic that names one points.
    let local = |name: &str, at: Span| Ident::new(name, Span::mixed_site().located_at(at));
    let here = Span::call_site();
    let name_var = local("__idem_name", here);
    let owner_var = local("__idem_store_owner", here);
    let store_var = local("__idem_store", here);
    let key_var = local("__idem_key", here);
    let fingerprint_var = local("__idem_fingerprint", here);
    let policy_var = local("__idem_policy", here);
    let eq_var = local("__idem_eq", here);
    let body_var = local("__idem_body", here);
    let out_var = local("__idem_out", here);
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
        ..
    } = func;
    // Outer attributes stay on the function; inner ones (`#![allow(..)]` at the top of the body)
    // open the generated body, which holds the user's body.
    let (outer, inner): (Vec<&Attribute>, Vec<&Attribute>) = attrs
        .iter()
        .partition(|attr| matches!(attr.style, AttrStyle::Outer));
    let ret = &checked.ret;

    let [major, minor, patch] = VERSION.map(Literal::u64_unsuffixed);

    // `name = ...` is the namespace exactly as written, so any process can compute the key as
    // `Key::new(name, &key)`. Without it, the namespace is the function's full path as the
    // compiler prints a closure defined in its body: module, nested scopes, impl self type, trait
    // and every type and const argument, so two distinct functions never share one.
    let name = match &args.name {
        Some(lit) => quote!(#lit),
        None => quote!(#krate::__private::function_path(&|| ())),
    };

    let key = match &args.key {
        Some(expr) => quote_spanned!(expr.span()=> &(#expr)),
        // One argument is the key itself, so `Key::new(name, &id)` and the function API's
        // `Idempotent::new(&store, id).name(name)` address its record; several are a tuple, in
        // the order of the signature; none is `()`.
        None => {
            let parts: Vec<TokenStream> = checked
                .key_args
                .iter()
                .map(|arg| {
                    let ident = &arg.ident;
                    quote_spanned!(arg.ty_span=> #krate::__private::key_part(&#ident))
                })
                .collect();
            match parts.as_slice() {
                [one] => one.clone(),
                parts => quote!(&(#(#parts,)*)),
            }
        }
    };

    // `let x = &(expr);` keeps a temporary store alive for the whole call.
    let (store_owner, store) = match &args.store {
        Some(expr) => {
            let owner = local("__idem_store_owner", expr.span());
            (
                quote_spanned!(expr.span()=> &(#expr)),
                quote_spanned!(expr.span()=> #krate::__private::store(#owner)),
            )
        }
        None => (
            quote!(#krate::__private::default_store()),
            quote!(#owner_var),
        ),
    };

    let fingerprint = match &args.fingerprint {
        Some(expr) => quote_spanned!(expr.span()=>
            ::core::option::Option::Some(#krate::__private::Fingerprint::of(&(#expr)))
        ),
        None => quote!(::core::option::Option::None),
    };

    let ttl = duration(
        &krate,
        args.ttl.as_ref(),
        quote!(#krate::__private::DEFAULT_TTL),
    );
    let lease = duration(
        &krate,
        args.lease.as_ref(),
        quote!(#krate::__private::DEFAULT_LEASE),
    );
    let wait_timeout = duration(
        &krate,
        args.wait_timeout.as_ref(),
        quote!(#krate::__private::DEFAULT_WAIT_TIMEOUT),
    );
    let on_conflict = match args.on_conflict {
        Some(OnConflict::Reject) => quote!(#krate::__private::OnConflict::Reject),
        Some(OnConflict::Wait) | None => quote!(#krate::__private::OnConflict::Wait),
    };

    // The result's bounds are one bound, checked at the return type, so a missing `Serialize`
    // or `From<idem::Error>` is reported once, where the user wrote the type.
    let krate_at_ret = krate_at(args, ret.span());
    // The arguments in `run`'s order, located at the return type like the call itself.
    let run_args = [
        &store_var,
        &name_var,
        &key_var,
        &fingerprint_var,
        &policy_var,
        &eq_var,
        &body_var,
    ]
    .map(|var| local(&var.to_string(), ret.span()));
    // With `outcome`, the function returns the value with its status and expiry.
    let runner = match args.outcome {
        Some(_) => Ident::new("run_with_outcome", ret.span()),
        None => Ident::new("run", ret.span()),
    };
    // `T` and `E` are named at the return type, so that a missing bound on either is reported
    // there, once, whatever argument the compiler would otherwise infer them from.
    let run = quote_spanned! {ret.span()=>
        #krate_at_ret::__private::#runner::<
            <#ret as #krate_at_ret::__private::IdemResult>::Ok,
            <#ret as #krate_at_ret::__private::IdemResult>::Err,
            _,
        >(#(#run_args),*).await
    };

    // A return edge that is never taken types the body's output as the function's return type
    // before the body is checked (tracing-attributes' "fake return edge"): a type error in the
    // body is then reported at the expression, as it would be without the attribute, and `?` and
    // `return` convert into the declared type. A `match` on `None` rather than a diverging `let`,
    // so that no code is unreachable for crates that deny `unreachable_code`.
    let return_edge = quote! {
        match ::core::option::Option::<#ret>::None {
            ::core::option::Option::Some(#out_var) => return #out_var,
            ::core::option::Option::None => {}
        }
    };

    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            const _: () = #krate::__private::version_check::<#major, #minor, #patch>();
            let #name_var: &'static str = #name;
            let #owner_var = #store_owner;
            let #store_var = #store;
            let #key_var = #krate::__private::key(#store_var, #name_var, #key);
            let #fingerprint_var = #fingerprint;
            let #policy_var = &#krate::__private::policy(#ttl, #lease, #on_conflict, #wait_timeout);
            let #eq_var = {
                #[allow(unused_imports)]
                use #krate::__private::{ViaPartialEq as _, WithoutPartialEq as _};
                (&#krate::__private::EqProbe::<<#ret as #krate::__private::IdemResult>::Ok>::new()).eq_fn()
            };
            let #body_var = async {
                #return_edge
                #block
            };
            #run
        }
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::idempotent;

    /// The expansion asks the runtime for the release this macro crate was built as, so a facade
    /// that pairs it with another runtime release fails with `MacroVersion`'s message.
    #[test]
    fn the_expansion_names_this_release() {
        let expanded = idempotent(
            quote!(key = id),
            quote!(
                async fn f(id: u64) -> Result<u64, E> {
                    Ok(id)
                }
            ),
        )
        .to_string();
        let version: Vec<&str> = env!("CARGO_PKG_VERSION")
            .split(['-', '+'])
            .next()
            .unwrap_or_default()
            .split('.')
            .collect();
        let check = format!(
            "version_check :: < {} , {} , {} > ()",
            version[0], version[1], version[2]
        );
        assert!(expanded.contains(&check), "{check} not in {expanded}");
    }
}
