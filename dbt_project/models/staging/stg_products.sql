select
    trim(product) as product,
    trim(category) as category,
    cast(price_usd as decimal(10, 2)) as price_usd
from {{ ref('products') }}
