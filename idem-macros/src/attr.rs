//! Parses the attribute's options into a typed model, reporting every mistake at once.
//!
//! The options are a `Punctuated<Item, Token![,]>` (tracing-attributes' `attr.rs` is the model):
//! each option starts with its keyword, and its value is parsed by syn as a whole, so any valid
//! expression is a value (`key = pair::<u64, u64>(a, b)`, `key = f(|x| x)`, `key = (a, b)`).
//! A mistake in one option is recorded at its own span and parsing resumes at the next top-level
//! `,`, so later options are still checked and one compile shows every mistake.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::discouraged::Speculative;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Path, Token};

use crate::duration;

mod kw {
    syn::custom_keyword!(key);
    syn::custom_keyword!(skip);
    syn::custom_keyword!(store);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(wait_timeout);
    syn::custom_keyword!(name);
    syn::custom_keyword!(fingerprint);
    syn::custom_keyword!(on_conflict);
    syn::custom_keyword!(outcome);
}

/// The options, in the order the documentation lists them.
const OPTIONS: &str =
    "key, skip, store, ttl, lease, wait_timeout, name, fingerprint, on_conflict, outcome, crate";

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

/// The attribute's options as written, and the mistakes found in them.
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
    /// `outcome`, where it was written: the function returns `Result<Outcome<T>, E>`.
    pub outcome: Option<Span>,
    /// `outcome` was written, with a mistake (already reported).
    pub outcome_invalid: bool,
    pub krate: Option<Path>,
    /// Every mistake in the options; the options that were well formed are set above, so the
    /// function's signature is still checked against them.
    pub errors: Errors,
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

/// Which option an item sets.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Key,
    Skip,
    Store,
    Ttl,
    Lease,
    WaitTimeout,
    Name,
    Fingerprint,
    OnConflict,
    Outcome,
    Crate,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::Skip => "skip",
            Kind::Store => "store",
            Kind::Ttl => "ttl",
            Kind::Lease => "lease",
            Kind::WaitTimeout => "wait_timeout",
            Kind::Name => "name",
            Kind::Fingerprint => "fingerprint",
            Kind::OnConflict => "on_conflict",
            Kind::Outcome => "outcome",
            Kind::Crate => "crate",
        }
    }

    fn example(self) -> &'static str {
        match self {
            Kind::Key => "`key = order.id`",
            Kind::Skip => "`skip(conn)`",
            Kind::Store => "`store = self.store`",
            Kind::Ttl => "`ttl = \"24h\"`",
            Kind::Lease => "`lease = \"30s\"`",
            Kind::WaitTimeout => "`wait_timeout = \"60s\"`",
            Kind::Name => "`name = \"payments.charge.v1\"`",
            Kind::Fingerprint => "`fingerprint = request.body_hash`",
            Kind::OnConflict => "`on_conflict = wait` or `on_conflict = reject`",
            Kind::Outcome => "`outcome`",
            Kind::Crate => "`crate = ::my_facade::idem`",
        }
    }

    /// Reads the option's keyword, if the input starts with one.
    fn parse(input: ParseStream) -> syn::Result<Option<(Kind, Span)>> {
        macro_rules! keyword {
            ($($kw:ident => $kind:expr),* $(,)?) => {
                $(
                    if input.peek(kw::$kw) {
                        let kw = input.parse::<kw::$kw>()?;
                        return Ok(Some(($kind, kw.span)));
                    }
                )*
            };
        }
        keyword! {
            key => Kind::Key,
            skip => Kind::Skip,
            store => Kind::Store,
            ttl => Kind::Ttl,
            lease => Kind::Lease,
            wait_timeout => Kind::WaitTimeout,
            name => Kind::Name,
            fingerprint => Kind::Fingerprint,
            on_conflict => Kind::OnConflict,
            outcome => Kind::Outcome,
        }
        if input.peek(Token![crate]) {
            let token = input.parse::<Token![crate]>()?;
            return Ok(Some((Kind::Crate, token.span)));
        }
        Ok(None)
    }
}

/// One option's value, already checked on its own.
enum Value {
    Expr(Expr),
    Skip(Vec<Ident>),
    Duration(DurationArg),
    Name(LitStr),
    OnConflict(OnConflict),
    /// An option without a value (`outcome`).
    Flag,
    Crate(Path),
}

/// One element of the list: an option, or the mistake found where one was expected. Parsing an
/// item never fails: a mistake is kept, and the input is left at the next top-level `,`.
enum Item {
    Option {
        kind: Kind,
        span: Span,
        value: Value,
    },
    /// A mistake, and the option it was in when it started with one's keyword.
    Invalid(syn::Error, Option<Kind>),
}

impl Parse for Item {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let started = Kind::parse(&input.fork())
            .ok()
            .flatten()
            .map(|(kind, _)| kind);
        let item = match parse_option(input) {
            Ok((kind, span, value)) => match expect_end_of_option(input, kind) {
                Ok(()) => Item::Option { kind, span, value },
                Err(err) => Item::Invalid(err, Some(kind)),
            },
            Err(err) => Item::Invalid(err, started),
        };
        if let Item::Invalid(..) = item {
            skip_to_comma(input)?;
        }
        Ok(item)
    }
}

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let items = Punctuated::<Item, Token![,]>::parse_terminated(input)?;
        let mut args = Args::default();
        let mut seen: Vec<Kind> = Vec::new();
        for item in items {
            let (kind, span, value) = match item {
                Item::Option { kind, span, value } => (kind, span, value),
                Item::Invalid(err, kind) => {
                    args.errors.push(err);
                    if kind == Some(Kind::Outcome) {
                        args.outcome_invalid = true;
                    }
                    continue;
                }
            };
            if seen.contains(&kind) {
                args.errors.push(syn::Error::new(
                    span,
                    format!("option `{}` is given more than once", kind.as_str()),
                ));
                continue;
            }
            seen.push(kind);
            args.set(kind, span, value);
        }
        Ok(args)
    }
}

impl Args {
    fn set(&mut self, kind: Kind, span: Span, value: Value) {
        match (kind, value) {
            (Kind::Key, Value::Expr(expr)) => self.key = Some(expr),
            (Kind::Store, Value::Expr(expr)) => self.store = Some(expr),
            (Kind::Fingerprint, Value::Expr(expr)) => self.fingerprint = Some(expr),
            (Kind::Skip, Value::Skip(idents)) => self.skip = idents,
            (Kind::Ttl, Value::Duration(d)) => self.ttl = Some(d),
            (Kind::Lease, Value::Duration(d)) => self.lease = Some(d),
            (Kind::WaitTimeout, Value::Duration(d)) => self.wait_timeout = Some(d),
            (Kind::Name, Value::Name(lit)) => self.name = Some(lit),
            (Kind::OnConflict, Value::OnConflict(policy)) => self.on_conflict = Some(policy),
            (Kind::Outcome, Value::Flag) => self.outcome = Some(span),
            (Kind::Crate, Value::Crate(path)) => self.krate = Some(path),
            // `parse_value` makes each kind's own value.
            _ => {}
        }
    }
}

/// Parses `keyword = value` or `skip(...)`.
fn parse_option(input: ParseStream) -> syn::Result<(Kind, Span, Value)> {
    let Some((kind, span)) = Kind::parse(input)? else {
        return Err(unknown_option(input));
    };
    let value = match kind {
        Kind::Skip => parse_skip(input, span)?,
        Kind::Outcome if input.peek(Token![=]) => {
            return Err(input.error(
                "option `outcome` takes no value: write `outcome`, and declare the return type as `Result<idem::Outcome<T>, E>`",
            ));
        }
        Kind::Outcome => Value::Flag,
        _ => {
            parse_eq(input, kind, span)?;
            parse_value(input, kind)?
        }
    };
    Ok((kind, span, value))
}

/// The error for input that does not start with a known option.
fn unknown_option(input: ParseStream) -> syn::Error {
    let fork = input.fork();
    match fork.call(Ident::parse_any) {
        Ok(ident) => {
            // A bare word after an option is most often a second key value: `key = a, b`.
            let bare = fork.is_empty() || fork.peek(Token![,]);
            let hint = if bare {
                "; to key on several values, give a tuple: `key = (a, b)`"
            } else {
                ""
            };
            syn::Error::new(
                ident.span(),
                format!("unknown option `{ident}`; known options: {OPTIONS}{hint}"),
            )
        }
        Err(_) => input.error(format!("expected an option; known options: {OPTIONS}")),
    }
}

/// The `=` between an option and its value, or an error that says the value is missing.
fn parse_eq(input: ParseStream, kind: Kind, span: Span) -> syn::Result<()> {
    let name = kind.as_str();
    if input.is_empty() || input.peek(Token![,]) {
        return Err(syn::Error::new(
            span,
            format!("option `{name}` needs a value, as in {}", kind.example()),
        ));
    }
    let Ok(eq) = input.parse::<Token![=]>() else {
        return Err(input.error(format!(
            "expected `=` after `{name}`, as in {}",
            kind.example()
        )));
    };
    if input.is_empty() || input.peek(Token![,]) {
        return Err(syn::Error::new(
            eq.span,
            format!(
                "option `{name}` needs a value after `=`, as in {}",
                kind.example()
            ),
        ));
    }
    Ok(())
}

/// After an option's value comes a `,` or the end of the list.
fn expect_end_of_option(input: ParseStream, kind: Kind) -> syn::Result<()> {
    if input.is_empty() || input.peek(Token![,]) {
        Ok(())
    } else {
        Err(input.error(format!(
            "expected `,` after the value of `{}`; options are separated by commas",
            kind.as_str()
        )))
    }
}

fn parse_value(input: ParseStream, kind: Kind) -> syn::Result<Value> {
    let expr = parse_expr(input)?;
    Ok(match kind {
        Kind::Ttl | Kind::Lease | Kind::WaitTimeout => Value::Duration(duration_arg(kind, expr)?),
        Kind::Name => Value::Name(name(expr)?),
        Kind::OnConflict => Value::OnConflict(on_conflict(expr)?),
        Kind::Crate => Value::Crate(crate_path(expr)?),
        Kind::Key | Kind::Store | Kind::Fingerprint | Kind::Skip | Kind::Outcome => {
            Value::Expr(expr)
        }
    })
}

/// Parses a whole expression. On failure the input moves past the tokens syn had read, so the
/// caller resynchronises at the next `,` after the mistake rather than at a `,` inside it (the
/// one in `f::<A, B>(a b)`, say).
///
/// The expression is parsed on a fork: a failed parse leaves unread tokens in the groups it
/// entered, and on the fork they cannot turn into a second, misleading "unexpected token".
fn parse_expr(input: ParseStream) -> syn::Result<Expr> {
    let fork = input.fork();
    match fork.parse::<Expr>() {
        Ok(expr) => {
            input.advance_to(&fork);
            Ok(expr)
        }
        Err(err) => {
            let stop = fork.cursor();
            let mut read = 0usize;
            let mut cursor = input.cursor();
            while cursor != stop {
                match cursor.token_tree() {
                    Some((_, next)) => {
                        cursor = next;
                        read += 1;
                    }
                    None => break,
                }
            }
            input.step(|cursor| {
                let mut rest = *cursor;
                for _ in 0..read {
                    match rest.token_tree() {
                        Some((_, next)) => rest = next,
                        None => break,
                    }
                }
                Ok(((), rest))
            })?;
            Err(err)
        }
    }
}

/// Moves the input to the next top-level `,` (or its end).
fn skip_to_comma(input: ParseStream) -> syn::Result<()> {
    input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tree, next)) = rest.token_tree() {
            if let proc_macro2::TokenTree::Punct(punct) = &tree
                && punct.as_char() == ','
            {
                break;
            }
            rest = next;
        }
        Ok(((), rest))
    })
}

/// `skip(a, b)`: argument names in parentheses.
fn parse_skip(input: ParseStream, span: Span) -> syn::Result<Value> {
    const USAGE: &str = "`skip` takes a list of argument names, as in `skip(conn, log)`";
    if !input.peek(syn::token::Paren) {
        return Err(syn::Error::new(span, USAGE));
    }
    let group: proc_macro2::Group = input.parse()?;
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
    Ok(Value::Skip(idents.into_iter().collect()))
}

fn duration_arg(kind: Kind, expr: Expr) -> syn::Result<DurationArg> {
    let option = kind.as_str();
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            let nanos =
                duration::parse(&lit.value()).map_err(|msg| syn::Error::new(lit.span(), msg))?;
            if nanos == 0 {
                return Err(syn::Error::new(
                    lit.span(),
                    format!("`{option}` must be greater than zero"),
                ));
            }
            Ok(DurationArg::Nanos(nanos))
        }
        Expr::Lit(lit) => Err(syn::Error::new(
            lit.span(),
            format!(
                "`{option}` takes a duration string such as \"30s\" or a `std::time::Duration` expression"
            ),
        )),
        expr => Ok(DurationArg::Expr(expr)),
    }
}

fn name(expr: Expr) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new(
                    lit.span(),
                    "`name` must not be empty: it is the namespace of the keys, as in `name = \"payments.charge.v1\"`; remove it to use the function's own identity",
                ));
            }
            Ok(lit)
        }
        other => Err(syn::Error::new_spanned(
            other,
            "`name` takes a string literal, as in `name = \"payments.charge.v1\"`: the namespace must be known at compile time so that other processes can compute the same keys",
        )),
    }
}

fn on_conflict(expr: Expr) -> syn::Result<OnConflict> {
    const HELP: &str = "expected `wait` (wait for the call holding the key and return its result) or `reject` (fail at once with `idem::Error::InProgress`)";
    let ident = match &expr {
        Expr::Path(ExprPath {
            qself: None, path, ..
        }) => path.get_ident(),
        _ => None,
    };
    match ident {
        Some(ident) if ident == "wait" => Ok(OnConflict::Wait),
        Some(ident) if ident == "reject" => Ok(OnConflict::Reject),
        Some(other) => Err(syn::Error::new(
            other.span(),
            format!("unknown on_conflict policy `{other}`; {HELP}"),
        )),
        None => Err(syn::Error::new_spanned(
            expr,
            format!("`on_conflict` takes `wait` or `reject`; {HELP}"),
        )),
    }
}

fn crate_path(expr: Expr) -> syn::Result<Path> {
    match expr {
        Expr::Path(ExprPath {
            qself: None,
            path,
            attrs,
        }) if attrs.is_empty() => Ok(path),
        other => Err(syn::Error::new_spanned(
            other,
            "`crate` takes the path of the `idem` crate, as in `crate = ::my_facade::idem`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use quote::{ToTokens, quote};

    use super::{Args, DurationArg};

    fn parse(tokens: proc_macro2::TokenStream) -> Args {
        match syn::parse2(tokens) {
            Ok(args) => args,
            Err(err) => panic!("parsing the options never fails as a whole: {err}"),
        }
    }

    fn errors(args: Args) -> Vec<String> {
        match args.errors.finish() {
            Ok(()) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_value_is_a_whole_expression() {
        let args = parse(quote!(key = pair::<u64, u64>(a, b), ttl = "1h", name = "n"));
        let key = args.key.as_ref().map(|k| k.to_token_stream().to_string());
        assert_eq!(key.as_deref(), Some("pair :: < u64 , u64 > (a , b)"));
        assert!(matches!(
            args.ttl,
            Some(DurationArg::Nanos(3_600_000_000_000))
        ));
        assert_eq!(args.name.as_ref().map(|n| n.value()).as_deref(), Some("n"));
        assert!(errors(args).is_empty());
    }

    #[test]
    fn a_mistake_does_not_hide_the_options_after_it() {
        let args = parse(quote!(key = f(a b), ttl = "soon", lease = "1s", colour = 1, ttl = "2h"));
        assert!(args.key.is_none());
        assert!(matches!(
            args.lease,
            Some(DurationArg::Nanos(1_000_000_000))
        ));
        let errors = errors(args);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("expected `,`"), "{errors:?}");
        assert!(errors[1].contains("`soon` is not a duration"), "{errors:?}");
        assert!(
            errors[2].starts_with("unknown option `colour`"),
            "{errors:?}"
        );
        // The second `ttl` is not a duplicate: the first one was not well formed.
    }

    #[test]
    fn each_option_is_checked_once() {
        let errors = errors(parse(quote!(
            ttl = "1h",
            key = a,
            ttl = "2h",
            skip(),
            on_conflict = later
        )));
        assert_eq!(
            errors,
            [
                "option `ttl` is given more than once",
                "`skip()` names no argument; name the arguments to leave out of the key, or remove it",
                "unknown on_conflict policy `later`; expected `wait` (wait for the call holding the key and return its result) or `reject` (fail at once with `idem::Error::InProgress`)",
            ]
        );
    }
}
