use idem::KeyPart;

struct Money(f64);

// A field whose type is not a key part: reported at the field.
#[derive(KeyPart)]
struct Order {
    id: u64,
    total: Money,
}

// Unions have no canonical encoding.
#[derive(KeyPart)]
union Bits {
    int: u32,
    float: f32,
}

// Unknown options.
#[derive(KeyPart)]
struct Tagged {
    #[key(rename = "x")]
    id: u64,
}

#[derive(KeyPart)]
enum Event {
    #[key(skip)]
    Paid(u64),
}

fn main() {}
