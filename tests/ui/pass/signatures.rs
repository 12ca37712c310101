//! Every signature and attribute a plain `async fn` may have keeps working under the attribute.

use std::fmt::Display;

use idem::idempotent;

// Doc comments, `cfg_attr` and other outer attributes stay on the function.
/// Charges an order once.
#[cfg_attr(not(test), allow(dead_code))]
#[idempotent(key = id)]
#[inline]
async fn documented(id: u64) -> Result<u64, idem::Error> {
    Ok(id)
}

// An inner attribute opens the body.
#[idempotent(key = id)]
async fn inner_attribute(id: u64, unused: u64) -> Result<u64, idem::Error> {
    #![allow(unused_variables)]
    let also_unused = 1;
    Ok(id)
}

// A `where` clause.
#[idempotent(key = id)]
async fn where_clause<T>(id: u64, tag: T) -> Result<String, idem::Error>
where
    T: Display + Send,
{
    Ok(tag.to_string())
}

// A lifetime-generic argument.
#[idempotent]
async fn lifetime<'a>(name: &'a str, id: u64) -> Result<String, idem::Error> {
    Ok(name.to_owned())
}

// `impl Trait` arguments.
#[idempotent(key = id)]
async fn impl_trait(id: u64, label: impl Display + Send) -> Result<String, idem::Error> {
    Ok(label.to_string())
}

// Const generics.
#[idempotent(key = id)]
async fn const_generic<const N: usize>(id: u64) -> Result<usize, idem::Error> {
    Ok(N)
}

// Arguments that mention `&mut` without holding a borrow: a function pointer and a closure
// bound (skipped from the key, since neither is a key part).
#[idempotent(key = id)]
async fn callbacks(
    id: u64,
    _reset: fn(&mut Vec<u64>),
    _visit: impl FnMut(&mut u64) + Send,
) -> Result<u64, idem::Error> {
    Ok(id)
}

// A `'static` lifetime argument that owns its data when decoded (`Cow` decodes as `Owned`).
#[idempotent(key = id)]
async fn label(id: u64) -> Result<std::borrow::Cow<'static, str>, idem::Error> {
    Ok(std::borrow::Cow::Borrowed("paid"))
}

// Methods of a generic impl and of a generic trait's impl.
struct Repo<T>(std::marker::PhantomData<T>);

impl<T: Send + Sync> Repo<T> {
    #[idempotent(key = id)]
    async fn load(id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }
}

trait Handler<E> {
    async fn handle(&self, id: u64) -> Result<u64, idem::Error>;
}

struct Consumer;
struct Created;

impl Handler<Created> for Consumer {
    #[idempotent(key = id)]
    async fn handle(&self, id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }
}

// A function nested in another.
async fn outer() -> Result<u64, idem::Error> {
    #[idempotent(key = id)]
    async fn nested(id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }
    nested(1).await
}

fn main() {
    let _ = documented(1);
    let _ = inner_attribute(1, 2);
    let _ = where_clause(1, "tag");
    let _ = lifetime("a", 1);
    let _ = impl_trait(1, 5u8);
    let _ = const_generic::<3>(1);
    let _ = callbacks(1, |v| v.clear(), |x| *x += 1);
    let _ = label(1);
    let _ = Repo::<u8>::load(1);
    let _ = Consumer.handle(1);
    let _ = outer();
}
