//! `#[derive(KeyPart)]`: a type's canonical key encoding, written from its fields.
//!
//! A struct encodes as the tuple of its fields in declaration order, so
//! `Order { id, customer }` is the key `(id, customer)` and any program can compute it with
//! `Key::new(name, &(id, customer))`. An enum variant encodes as the tuple of its name and its
//! fields: `Event::Paid { order }` is `("Paid", order)`, and a unit variant `("Cancelled",)`.
//! Fields marked `#[key(skip)]` are left out. The encoding goes through `KeyPart` impls only, so
//! it is as stable as theirs (golden vectors in `tests/keys.rs`).

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{
    Data, DeriveInput, Fields, GenericParam, Index, LitStr, Path, Type, WherePredicate, parse_quote,
};

pub(crate) fn key_part(input: TokenStream) -> TokenStream {
    match derive(input) {
        Ok(tokens) => tokens,
        Err(err) => err.into_compile_error(),
    }
}

/// What `#[key(...)]` says about a field.
struct FieldOptions {
    skip: bool,
}

fn derive(input: TokenStream) -> syn::Result<TokenStream> {
    let input: DeriveInput = syn::parse2(input)?;
    let krate = container_crate(&input)?;
    let name = &input.ident;
    let enc = format_ident!("__idem_enc", span = Span::mixed_site());

    let body = match &input.data {
        Data::Struct(data) => {
            let (pattern, encode) = fields(&data.fields, &krate, &enc)?;
            quote! {
                let Self #pattern = self;
                #encode
            }
        }
        Data::Enum(data) => {
            let mut arms = Vec::new();
            for variant in &data.variants {
                let ident = &variant.ident;
                for attr in &variant.attrs {
                    if attr.path().is_ident("key") {
                        return Err(syn::Error::new_spanned(
                            attr,
                            "`#[key(...)]` is not allowed on a variant: every variant is part of the key (mark fields `#[key(skip)]` instead)",
                        ));
                    }
                }
                let label = LitStr::new(&ident.to_string(), ident.span());
                let (pattern, encode) = variant_fields(&variant.fields, &krate, &enc, &label)?;
                arms.push(quote! {
                    Self::#ident #pattern => { #encode }
                });
            }
            if arms.is_empty() {
                // An enum without variants has no values: nothing to encode.
                quote!(match *self {})
            } else {
                quote! {
                    match self {
                        #(#arms)*
                    }
                }
            }
        }
        Data::Union(data) => {
            return Err(syn::Error::new(
                data.union_token.span(),
                "`#[derive(KeyPart)]` is not available for unions: which field holds the value is not known, so it has no canonical encoding; implement `KeyPart` by hand",
            ));
        }
    };

    // Every type parameter must be a key part (as serde bounds its parameters); each field's
    // own type is checked where it is encoded, at its tokens.
    let mut generics = input.generics.clone();
    let params: Vec<_> = generics
        .params
        .iter()
        .filter_map(|param| match param {
            GenericParam::Type(ty) => Some(ty.ident.clone()),
            _ => None,
        })
        .collect();
    {
        let clause = generics.make_where_clause();
        for param in params {
            let bound: WherePredicate = parse_quote!(#param: #krate::KeyPart);
            clause.predicates.push(bound);
        }
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();

    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #krate::KeyPart for #name #ty_generics #where_clause {
            fn encode(&self, #enc: &mut #krate::key::Encoder<'_>) {
                #body
            }
        }
    })
}

/// `#[key(crate = path)]` on the type, for crates that re-export idem; `::idem` otherwise.
fn container_crate(input: &DeriveInput) -> syn::Result<TokenStream> {
    let mut krate: Option<Path> = None;
    for attr in &input.attrs {
        if !attr.path().is_ident("key") {
            continue;
        }
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let value: LitStr = meta.value()?.parse()?;
                krate = Some(value.parse()?);
                Ok(())
            } else {
                Err(meta.error(
                    "unknown option; on the type, `#[key(...)]` takes `crate = \"path::to::idem\"`",
                ))
            }
        })?;
    }
    Ok(match krate {
        Some(path) => quote!(#path),
        None => quote!(::idem),
    })
}

fn field_options(attrs: &[syn::Attribute]) -> syn::Result<FieldOptions> {
    let mut options = FieldOptions { skip: false };
    for attr in attrs {
        if !attr.path().is_ident("key") {
            continue;
        }
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("skip") {
                options.skip = true;
                Ok(())
            } else {
                Err(meta.error(
                    "unknown option; on a field, `#[key(...)]` takes `skip` (leave the field out of the key)",
                ))
            }
        })?;
    }
    Ok(options)
}

/// The bindings of a struct's or variant's fields, and the encoding of the ones in the key
/// (each binding a reference, as `match self` gives).
struct Bound {
    pattern: TokenStream,
    /// The encoding of each kept field, located at its type: a type that is not a key part is
    /// reported there, once.
    kept: Vec<TokenStream>,
}

fn bind(fields: &Fields, krate: &TokenStream, enc: &syn::Ident) -> syn::Result<Bound> {
    let encode = |binding: &syn::Ident, ty: &Type| {
        quote_spanned! {ty.span()=> #krate::KeyPart::encode(#binding, #enc);}
    };
    let mut kept = Vec::new();
    let pattern = match fields {
        Fields::Named(named) => {
            let mut parts = Vec::new();
            for field in &named.named {
                let options = field_options(&field.attrs)?;
                let ident = field
                    .ident
                    .clone()
                    .ok_or_else(|| syn::Error::new(field.span(), "a named field without a name"))?;
                if options.skip {
                    parts.push(quote!(#ident: _));
                } else {
                    let binding = format_ident!(
                        "__idem_{}",
                        ident,
                        span = Span::mixed_site().located_at(field.ty.span())
                    );
                    parts.push(quote!(#ident: #binding));
                    kept.push(encode(&binding, &field.ty));
                }
            }
            quote!({ #(#parts,)* })
        }
        Fields::Unnamed(unnamed) => {
            let mut parts = Vec::new();
            for (i, field) in unnamed.unnamed.iter().enumerate() {
                let options = field_options(&field.attrs)?;
                if options.skip {
                    parts.push(quote!(_));
                } else {
                    let binding = format_ident!(
                        "__idem_{}",
                        i,
                        span = Span::mixed_site().located_at(field.ty.span())
                    );
                    parts.push(quote!(#binding));
                    kept.push(encode(&binding, &field.ty));
                }
            }
            quote!(( #(#parts,)* ))
        }
        Fields::Unit => quote!(),
    };
    Ok(Bound { pattern, kept })
}

/// A struct: the tuple of its kept fields.
fn fields(
    fields: &Fields,
    krate: &TokenStream,
    enc: &syn::Ident,
) -> syn::Result<(TokenStream, TokenStream)> {
    let Bound { pattern, kept } = bind(fields, krate, enc)?;
    let len = Index::from(kept.len());
    let encode = quote! {
        #enc.write_tuple_header(#len);
        #(#kept)*
    };
    Ok((pattern, encode))
}

/// An enum variant: the tuple of its name and its kept fields.
fn variant_fields(
    fields: &Fields,
    krate: &TokenStream,
    enc: &syn::Ident,
    label: &LitStr,
) -> syn::Result<(TokenStream, TokenStream)> {
    let Bound { pattern, kept } = bind(fields, krate, enc)?;
    let len = Index::from(kept.len() + 1);
    let encode = quote! {
        #enc.write_tuple_header(#len);
        #krate::KeyPart::encode(#label, #enc);
        #(#kept)*
    };
    Ok((pattern, encode))
}
