//! The rules of the contract, checked against the function's signature.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{
    FnArg, GenericArgument, Ident, ItemFn, Lifetime, Pat, PathArguments, ReceiverKind, ReturnType,
    Signature, Type, TypeImplTrait, TypeParamBound, TypeReference,
};

use crate::attr::{Args, Errors};

/// An argument that goes into the default key.
pub(crate) struct KeyArg {
    pub ident: Ident,
    pub ty_span: Span,
}

/// What the expansion needs to know about the function, once it is known to be valid.
pub(crate) struct Checked {
    /// The arguments of the default key (empty when `key = ...` is given).
    pub key_args: Vec<KeyArg>,
    /// The body's return type, `Result<T, E>`: the function's own, or with `outcome` the
    /// function's `Result<Outcome<T>, E>` without the `Outcome`.
    pub ret: Type,
}

pub(crate) fn check(args: &Args, item: &ItemFn, errors: &mut Errors) -> Option<Checked> {
    let sig = &item.sig;
    if sig.asyncness.is_none() && rewritten_by_async_trait(sig) {
        // Every other rule would be checked against async-trait's rewrite, not what the user
        // wrote ("write `async fn`" under their `async fn`): this is the only error.
        errors.push(syn::Error::new(
            Span::call_site(),
            "`#[idempotent]` cannot be used on a method of an `#[async_trait]` impl: `#[async_trait]` has already rewritten this `async fn` into a `fn` returning a boxed future; put `#[idempotent]` on an inherent `async fn` and call it from the trait method, or drop `#[async_trait]` and use `async fn` in the trait itself (Rust 1.75 and later)",
        ));
        return None;
    }
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span(),
            "`#[idempotent]` needs an `async fn`: write `async fn` (the body's result is claimed, stored and replayed through an async store)",
        ));
    }
    if let Some(constness) = &sig.constness {
        errors.push(syn::Error::new(
            constness.span(),
            "`#[idempotent]` cannot be used on a `const fn`",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new(
            variadic.span(),
            "`#[idempotent]` cannot be used on a variadic function",
        ));
    }

    let output = match args.outcome {
        Some(flag) => match without_outcome(flag, &sig.output) {
            Ok(output) => Some(output),
            Err(err) => {
                errors.push(err);
                None
            }
        },
        None => {
            if args.outcome_invalid {
                None
            } else if let Some(outcome) = idem_outcome(&sig.output) {
                errors.push(syn::Error::new_spanned(
                    outcome,
                    "this function returns an `Outcome`: add the `outcome` option (`#[idempotent(outcome, ...)]`), and the body returns `Result<T, E>` while callers get `Outcome<T>` (if `Outcome` is a type of your own, write it with its module path, as `crate::Outcome<T>`)",
                ));
                None
            } else {
                Some(sig.output.clone())
            }
        }
    };
    let ret = output.and_then(|output| check_return(sig.ident.span(), &output, errors));

    let mut typed: Vec<(&Pat, &Type)> = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                let is_mut_ref = match &receiver.kind {
                    ReceiverKind::Reference(_, _, mutability) => mutability.is_some(),
                    // `self: &mut Self`, `self: Pin<&mut Self>`
                    ReceiverKind::Typed(_, ty) => mut_borrow(ty).is_some(),
                    _ => false,
                };
                if is_mut_ref {
                    errors.push(syn::Error::new_spanned(
                        receiver,
                        "`#[idempotent]` methods cannot take `&mut self`: a replay returns the stored result without running the body, so it could not repeat the body's changes to `self`; take `&self` and keep mutable state behind a lock or in the store",
                    ));
                }
            }
            FnArg::Typed(pat_type) => {
                if let Some(borrow) = mut_borrow(&pat_type.ty) {
                    let arg = pat_display(&pat_type.pat);
                    let message = if std::ptr::eq(borrow, &*pat_type.ty) {
                        format!(
                            "`#[idempotent]` functions cannot take `&mut` arguments: a replay returns the stored result without running the body, so it could not repeat the body's changes to `{arg}`; return the new value in the result instead"
                        )
                    } else {
                        format!(
                            "`#[idempotent]` functions cannot take `&mut` arguments, nor arguments that hold one: a replay returns the stored result without running the body, so it could not repeat the body's changes through this `&mut` in `{arg}`; return the new value in the result instead"
                        )
                    };
                    errors.push(syn::Error::new_spanned(borrow, message));
                }
                typed.push((&pat_type.pat, &pat_type.ty));
            }
        }
    }

    for skipped in &args.skip {
        let exists = typed
            .iter()
            .any(|(pat, _)| matches!(pat, Pat::Ident(p) if p.ident == *skipped));
        if !exists {
            errors.push(syn::Error::new(
                skipped.span(),
                format!("`skip({skipped})` names no argument of this function"),
            ));
        }
    }
    if args.key.is_some() && !args.skip.is_empty() {
        errors.push(syn::Error::new(
            args.skip[0].span(),
            "`skip(...)` has no effect when `key = ...` is given: the key is exactly the expression; remove one of them",
        ));
    }

    let mut key_args = Vec::new();
    if args.key.is_none() {
        for (pat, ty) in &typed {
            match pat {
                Pat::Ident(p) if p.subpat.is_none() => {
                    if !args.skip.contains(&p.ident) {
                        key_args.push(KeyArg {
                            ident: p.ident.clone(),
                            ty_span: ty.span(),
                        });
                    }
                }
                other => errors.push(syn::Error::new(
                    other.span(),
                    "this argument is a pattern, so it cannot be part of the default key; bind it to a name, or give the key with `key = ...`",
                )),
            }
        }
    }

    ret.map(|ret| Checked { key_args, ret })
}

/// Whether `sig` is the shape `#[async_trait]` gives an `async fn`: a `fn` generic over
/// `'async_trait` that returns `Pin<Box<dyn Future<Output = ...> + Send + 'async_trait>>`.
fn rewritten_by_async_trait(sig: &Signature) -> bool {
    fn names_async_trait(tokens: TokenStream) -> bool {
        let mut after_quote = false;
        tokens.into_iter().any(|tree| match tree {
            TokenTree::Group(group) => names_async_trait(group.stream()),
            TokenTree::Punct(punct) => {
                after_quote = punct.as_char() == '\'';
                false
            }
            TokenTree::Ident(ident) => std::mem::take(&mut after_quote) && ident == "async_trait",
            TokenTree::Literal(_) => {
                after_quote = false;
                false
            }
        })
    }
    sig.generics
        .lifetimes()
        .any(|param| param.lifetime.ident == "async_trait")
        || names_async_trait(sig.output.to_token_stream())
}

/// The first `&mut` borrow that a value of type `ty` holds, looking through references, tuples,
/// arrays, slices and type arguments (`Option<&mut T>`, `(u8, &mut u8)`, `Box<&mut T>`).
///
/// Function pointers (`fn(&mut T)`) and the arguments of trait bounds (`impl FnMut(&mut T)`,
/// `impl Into<T>`) describe what the value does, not what it holds, and are not looked into;
/// only a bound's associated types are (`impl Iterator<Item = &mut T>` yields borrows).
fn mut_borrow(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Reference(r) if r.mutability.is_some() => Some(ty),
        Type::Reference(r) => mut_borrow(&r.elem),
        Type::Paren(p) => mut_borrow(&p.elem),
        Type::Group(g) => mut_borrow(&g.elem),
        Type::Slice(s) => mut_borrow(&s.elem),
        Type::Array(a) => mut_borrow(&a.elem),
        Type::Tuple(t) => t.elems.iter().find_map(mut_borrow),
        Type::Path(p) if p.qself.is_none() => {
            p.path.segments.iter().find_map(|seg| match &seg.arguments {
                PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                    GenericArgument::Type(t) => mut_borrow(t),
                    GenericArgument::AssocType(assoc) => mut_borrow(&assoc.ty),
                    _ => None,
                }),
                _ => None,
            })
        }
        Type::ImplTrait(t) => bounds_mut_borrow(t.bounds.iter()),
        Type::TraitObject(t) => bounds_mut_borrow(t.bounds.iter()),
        _ => None,
    }
}

/// The first `&mut` in an associated type of a trait bound (`Iterator<Item = &mut T>`).
fn bounds_mut_borrow<'a>(mut bounds: impl Iterator<Item = &'a TypeParamBound>) -> Option<&'a Type> {
    bounds.find_map(|bound| match bound {
        TypeParamBound::Trait(t) => t.path.segments.iter().find_map(|seg| match &seg.arguments {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                GenericArgument::AssocType(assoc) => mut_borrow(&assoc.ty),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

fn pat_display(pat: &Pat) -> String {
    match pat {
        Pat::Ident(p) => p.ident.to_string(),
        _ => "the argument".to_owned(),
    }
}

/// The `Ok` type of a return type written `Result<Outcome<T>, E>` or `Result<idem::Outcome<T>,
/// E>` (or an alias's first argument likewise), if it is one.
pub(crate) fn idem_outcome(output: &ReturnType) -> Option<&Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let Type::Path(path) = &**ty else {
        return None;
    };
    let PathArguments::AngleBracketed(generic) = &path.path.segments.last()?.arguments else {
        return None;
    };
    let Some(GenericArgument::Type(ok)) = generic.args.first() else {
        return None;
    };
    let Type::Path(ok_path) = ok else {
        return None;
    };
    let segments: Vec<String> = ok_path
        .path
        .segments
        .iter()
        .map(|seg| seg.ident.to_string())
        .collect();
    let is_idem = match segments.as_slice() {
        [last] => last == "Outcome",
        [.., krate, last] => krate == "idem" && last == "Outcome",
        [] => false,
    };
    (ok_path.qself.is_none() && is_idem).then_some(ok)
}

/// With `outcome`, the function returns `Result<Outcome<T>, E>` (any path ending in `Outcome`,
/// as `idem::Outcome<T>`, in the first type argument of `Result` or an alias of it) and its body
/// `Result<T, E>`: the return type with that `Outcome<T>` replaced by `T`.
fn without_outcome(flag: Span, output: &ReturnType) -> syn::Result<ReturnType> {
    const MUST: &str = "with `outcome`, the function must return `Result<idem::Outcome<T>, E>`; its body returns `Result<T, E>`, and callers get the value with its `status` (executed or replayed) and `expires_in`";
    let ReturnType::Type(arrow, ty) = output else {
        return Err(syn::Error::new(flag, MUST));
    };
    let mut body = (**ty).clone();
    let first = match &mut body {
        Type::Path(path) if path.qself.is_none() => {
            path.path
                .segments
                .last_mut()
                .and_then(|last| match &mut last.arguments {
                    PathArguments::AngleBracketed(generic) => generic.args.first_mut(),
                    _ => None,
                })
        }
        _ => None,
    };
    let Some(GenericArgument::Type(ok)) = first else {
        return Err(syn::Error::new_spanned(ty, MUST));
    };
    let inner = match &*ok {
        Type::Path(path) if path.qself.is_none() => path
            .path
            .segments
            .last()
            .filter(|last| last.ident == "Outcome")
            .and_then(|last| match &last.arguments {
                PathArguments::AngleBracketed(generic) if generic.args.len() == 1 => {
                    match generic.args.first() {
                        Some(GenericArgument::Type(inner)) => Some(inner.clone()),
                        _ => None,
                    }
                }
                _ => None,
            }),
        _ => None,
    };
    let Some(inner) = inner else {
        return Err(syn::Error::new_spanned(&*ok, MUST));
    };
    *ok = inner;
    Ok(ReturnType::Type(*arrow, Box::new(body)))
}

/// The return type must be `Result<T, E>`, or an alias of it (checked by the type checker
/// through `IdemResult`), with an owned `T`.
fn check_return(name_span: Span, output: &ReturnType, errors: &mut Errors) -> Option<Type> {
    const MUST: &str = "`#[idempotent]` functions must return `Result<T, E>`: only `Ok` results are stored and replayed, and store failures reach the caller through `E: From<idem::Error>`";
    let ty = match output {
        ReturnType::Default => {
            errors.push(syn::Error::new(name_span, MUST));
            return None;
        }
        ReturnType::Type(_, ty) => &**ty,
    };
    let last = match ty {
        Type::Path(path) if path.qself.is_none() => path.path.segments.last(),
        _ => None,
    };
    let Some(last) = last.filter(|seg| !is_primitive(&seg.ident) && seg.ident != "Option") else {
        errors.push(syn::Error::new_spanned(ty, MUST));
        return None;
    };
    let ok = match &last.arguments {
        PathArguments::AngleBracketed(generic) => match generic.args.first() {
            Some(GenericArgument::Type(ok)) => Some(ok),
            _ => None,
        },
        _ => None,
    };
    // The expansion names the return type (`<R as IdemResult>::Ok`, the body's declared output),
    // where `impl Trait` is not allowed: without this, rustc's E0562 points into the expansion.
    if let Some(opaque) = ok.and_then(impl_trait) {
        errors.push(syn::Error::new_spanned(
            opaque,
            "`#[idempotent]` functions cannot have `impl Trait` in the `Ok` type: a replay decodes the stored result into that type, so it must be named; write the concrete type",
        ));
        return None;
    }
    if let Some(opaque) = impl_trait(ty) {
        errors.push(syn::Error::new_spanned(
            opaque,
            "`#[idempotent]` functions cannot have `impl Trait` in their return type: the attribute names the `Ok` and error types, so they must be written out; write the concrete type",
        ));
        return None;
    }
    if let Some(ok) = ok
        && let Some(borrow) = borrowed(ok)
    {
        const OWNED: &str = "`#[idempotent]` functions must return owned data: the result is stored and replayed to later callers, possibly in another process, so it cannot borrow";
        const RETURN: &str = "return `String`, `Vec<T>` or another owned type";
        errors.push(match borrow {
            Borrow::Reference(r) if is_static(r.lifetime.as_ref()) => syn::Error::new_spanned(
                r,
                format!(
                    "{OWNED}, not even for `'static`: a replay decodes the result from stored bytes that do not live for `'static`; {RETURN}"
                ),
            ),
            Borrow::Reference(r) => syn::Error::new_spanned(r, format!("{OWNED}; {RETURN}")),
            Borrow::Lifetime(l) => syn::Error::new_spanned(l, format!("{OWNED}; {RETURN}")),
        });
        return None;
    }
    Some(ty.clone())
}

fn is_primitive(ident: &Ident) -> bool {
    const PRIMITIVES: &[&str] = &[
        "bool", "char", "str", "String", "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16",
        "i32", "i64", "i128", "isize", "f32", "f64", "Vec", "Box",
    ];
    PRIMITIVES.iter().any(|p| ident == p)
}

/// The first `impl Trait` inside `ty`, if any.
fn impl_trait(ty: &Type) -> Option<&TypeImplTrait> {
    fn in_args(args: &PathArguments) -> Option<&TypeImplTrait> {
        match args {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                GenericArgument::Type(t) => impl_trait(t),
                GenericArgument::AssocType(assoc) => impl_trait(&assoc.ty),
                _ => None,
            }),
            _ => None,
        }
    }

    match ty {
        Type::ImplTrait(t) => Some(t),
        Type::Reference(r) => impl_trait(&r.elem),
        Type::Ptr(p) => impl_trait(&p.elem),
        Type::Paren(p) => impl_trait(&p.elem),
        Type::Group(g) => impl_trait(&g.elem),
        Type::Slice(s) => impl_trait(&s.elem),
        Type::Array(a) => impl_trait(&a.elem),
        Type::Tuple(t) => t.elems.iter().find_map(impl_trait),
        Type::Path(p) => p.qself.iter().find_map(|q| impl_trait(&q.ty)).or_else(|| {
            p.path
                .segments
                .iter()
                .find_map(|seg| in_args(&seg.arguments))
        }),
        Type::TraitObject(t) => t.bounds.iter().find_map(|bound| match bound {
            TypeParamBound::Trait(t) => t
                .path
                .segments
                .iter()
                .find_map(|seg| in_args(&seg.arguments)),
            _ => None,
        }),
        _ => None,
    }
}

/// A borrow in a result type.
enum Borrow<'a> {
    /// A reference, `'static` ones included: a replay decodes a new value, which no reference
    /// of the function's caller can point to (`&'static str` is not `DeserializeOwned`).
    Reference(&'a TypeReference),
    /// A lifetime argument other than `'static` (`Cow<'a, str>`).
    Lifetime(&'a Lifetime),
}

fn is_static(lifetime: Option<&Lifetime>) -> bool {
    lifetime.is_some_and(|l| l.ident == "static")
}

/// The first borrow inside `ty`, if any.
fn borrowed(ty: &Type) -> Option<Borrow<'_>> {
    match ty {
        Type::Reference(r) => Some(Borrow::Reference(r)),
        Type::Paren(p) => borrowed(&p.elem),
        Type::Group(g) => borrowed(&g.elem),
        Type::Slice(s) => borrowed(&s.elem),
        Type::Array(a) => borrowed(&a.elem),
        Type::Tuple(t) => t.elems.iter().find_map(borrowed),
        Type::Path(p) => p.path.segments.iter().find_map(|seg| match &seg.arguments {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                GenericArgument::Type(t) => borrowed(t),
                GenericArgument::Lifetime(l) if !is_static(Some(l)) => Some(Borrow::Lifetime(l)),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    }
}
