//! Parses the attribute's options into a typed model, reporting every mistake at once.

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, LitStr, Path, Token};

use crate::duration;

/// The options, in the order the documentation lists them.
pub(crate) const OPTIONS: &[&str] = &[
    "key",
    "skip",
    "store",
    "ttl",
    "lease",
    "wait_timeout",
    "name",
    "fingerprint",
    "on_conflict",
    "crate",
];

/// A duration option: a literal parsed at compile time, or an expression of type `Duration`.
pub(crate) enum DurationArg {
    Nanos(u64),
    Expr(Expr),
}

/// What to do while another call holds the key.
pub(crate) enum OnConflict {
    Wait,
    Reject,
}

/// The attribute's options as written.
#[derive(Default)]
pub(crate) struct Args {
    pub key: Option<Expr>,
    pub skip: Vec<Ident>,
    pub store: Option<Expr>,
    pub ttl: Option<DurationArg>,
    pub lease: Option<DurationArg>,
    pub wait_timeout: Option<DurationArg>,
    pub name: Option<LitStr>,
    pub fingerprint: Option<Expr>,
    pub on_conflict: Option<OnConflict>,
    pub krate: Option<Path>,
}

/// Collects errors so that one compile shows every mistake.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Parses the attribute's arguments: `name = value` or `skip(a, b)`, separated by commas.
pub(crate) fn parse(args: TokenStream, errors: &mut Errors) -> Args {
    let mut parsed = Args::default();
    let mut seen: Vec<String> = Vec::new();
    for chunk in split_top_level_commas(args) {
        let mut tokens = chunk.into_iter();
        let Some(first) = tokens.next() else {
            continue; // a trailing comma
        };
        let TokenTree::Ident(option) = first else {
            errors.push(syn::Error::new(
                first.span(),
                format!(
                    "expected an option name; known options: {}",
                    OPTIONS.join(", ")
                ),
            ));
            continue;
        };
        let name = option.to_string();
        if !OPTIONS.contains(&name.as_str()) {
            errors.push(syn::Error::new(
                option.span(),
                format!(
                    "unknown option `{name}`; known options: {}",
                    OPTIONS.join(", ")
                ),
            ));
            continue;
        }
        if seen.contains(&name) {
            errors.push(syn::Error::new(
                option.span(),
                format!("option `{name}` is given more than once"),
            ));
            continue;
        }
        seen.push(name.clone());
        let rest: Vec<TokenTree> = tokens.collect();
        if name == "skip" {
            match parse_skip(&option, &rest) {
                Ok(idents) => parsed.skip = idents,
                Err(err) => errors.push(err),
            }
            continue;
        }
        let value = match value_tokens(&option, &rest) {
            Ok(value) => value,
            Err(err) => {
                errors.push(err);
                continue;
            }
        };
        if let Err(err) = set(&mut parsed, &option, value) {
            errors.push(err);
        }
    }
    parsed
}

fn split_top_level_commas(args: TokenStream) -> Vec<Vec<TokenTree>> {
    let mut chunks = vec![Vec::new()];
    for token in args {
        match &token {
            TokenTree::Punct(p) if p.as_char() == ',' => chunks.push(Vec::new()),
            _ => {
                if let Some(last) = chunks.last_mut() {
                    last.push(token);
                }
            }
        }
    }
    chunks
}

fn example(option: &str) -> &'static str {
    match option {
        "key" => "`key = order.id`",
        "store" => "`store = self.store`",
        "ttl" => "`ttl = \"24h\"`",
        "lease" => "`lease = \"30s\"`",
        "wait_timeout" => "`wait_timeout = \"60s\"`",
        "name" => "`name = \"payments.charge.v1\"`",
        "fingerprint" => "`fingerprint = request.body_hash`",
        "on_conflict" => "`on_conflict = wait` or `on_conflict = reject`",
        "crate" => "`crate = ::my_facade::idem`",
        _ => "`skip(conn)`",
    }
}

/// The tokens after `option =`, or an error that says the value is missing.
fn value_tokens(option: &Ident, rest: &[TokenTree]) -> syn::Result<TokenStream> {
    let name = option.to_string();
    let missing = || {
        syn::Error::new(
            option.span(),
            format!("option `{name}` needs a value, as in {}", example(&name)),
        )
    };
    match rest.split_first() {
        Some((TokenTree::Punct(eq), value)) if eq.as_char() == '=' => {
            if value.is_empty() {
                Err(syn::Error::new(
                    eq.span(),
                    format!(
                        "option `{name}` needs a value after `=`, as in {}",
                        example(&name)
                    ),
                ))
            } else {
                Ok(value.iter().cloned().collect())
            }
        }
        Some((other, _)) => Err(syn::Error::new(
            other.span(),
            format!("expected `=` after `{name}`, as in {}", example(&name)),
        )),
        None => Err(missing()),
    }
}

fn parse_skip(option: &Ident, rest: &[TokenTree]) -> syn::Result<Vec<Ident>> {
    match rest {
        [TokenTree::Group(group)] if group.delimiter() == Delimiter::Parenthesis => {
            let idents = syn::parse::Parser::parse2(
                Punctuated::<Ident, Token![,]>::parse_terminated,
                group.stream(),
            )
            .map_err(|err| {
                syn::Error::new(
                    err.span(),
                    "`skip(...)` takes argument names separated by commas, as in `skip(conn, log)`",
                )
            })?;
            if idents.is_empty() {
                return Err(syn::Error::new(
                    group.span(),
                    "`skip()` names no argument; name the arguments to leave out of the key, or remove it",
                ));
            }
            Ok(idents.into_iter().collect())
        }
        _ => Err(syn::Error::new(
            option.span(),
            "`skip` takes a list of argument names, as in `skip(conn, log)`",
        )),
    }
}

fn set(args: &mut Args, option: &Ident, value: TokenStream) -> syn::Result<()> {
    match option.to_string().as_str() {
        "key" => args.key = Some(syn::parse2(value)?),
        "store" => args.store = Some(syn::parse2(value)?),
        "fingerprint" => args.fingerprint = Some(syn::parse2(value)?),
        "ttl" => args.ttl = Some(parse_duration(option, value)?),
        "lease" => args.lease = Some(parse_duration(option, value)?),
        "wait_timeout" => args.wait_timeout = Some(parse_duration(option, value)?),
        "name" => {
            let lit: LitStr = syn::parse2(value.clone()).map_err(|_| {
                syn::Error::new_spanned(
                    &value,
                    "`name` takes a string literal, as in `name = \"payments.charge.v1\"`",
                )
            })?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
            }
            args.name = Some(lit);
        }
        "on_conflict" => {
            let policy: Ident = syn::parse2(value.clone()).map_err(|_| {
                syn::Error::new_spanned(&value, "`on_conflict` takes `wait` or `reject`")
            })?;
            args.on_conflict = Some(match policy.to_string().as_str() {
                "wait" => OnConflict::Wait,
                "reject" => OnConflict::Reject,
                other => {
                    return Err(syn::Error::new(
                        policy.span(),
                        format!(
                            "unknown on_conflict policy `{other}`; expected `wait` (wait for the call holding the key and return its result) or `reject` (fail at once with `idem::Error::InProgress`)"
                        ),
                    ));
                }
            });
        }
        "crate" => args.krate = Some(syn::parse2(value)?),
        _ => {}
    }
    Ok(())
}

fn parse_duration(option: &Ident, value: TokenStream) -> syn::Result<DurationArg> {
    if let Ok(lit) = syn::parse2::<LitStr>(value.clone()) {
        let nanos =
            duration::parse(&lit.value()).map_err(|msg| syn::Error::new(lit.span(), msg))?;
        if nanos == 0 {
            return Err(syn::Error::new(
                lit.span(),
                format!("`{option}` must be greater than zero"),
            ));
        }
        return Ok(DurationArg::Nanos(nanos));
    }
    let expr: Expr = syn::parse2(value)?;
    if let Expr::Lit(lit) = &expr {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{option}` takes a duration string such as \"30s\" or a `std::time::Duration` expression"
            ),
        ));
    }
    Ok(DurationArg::Expr(expr))
}
