-- One row per review with its enrichment from batch-bridge (job `review_enrichment`).
-- Every review appears, answered or not: `status` is NULL until the bridge has a result for it.
-- sentiment/topics/summary come only from usable answers (succeeded and not stale); a stale answer
-- describes an older version of the review, so it is shown as status only, until it is re-answered.
with reviews as (
    select * from {{ ref('stg_reviews') }}
),

results as (
    select * from {{ source('batch_bridge', 'review_enrichment') }}
),

answers as (
    {{ batch_bridge_latest_succeeded(source('batch_bridge', 'review_enrichment')) }}
)

select
    reviews.review_id,
    reviews.product,
    products.category,
    reviews.rating,
    reviews.title,
    reviews.body,
    reviews.created_at,
    answers.review_id is not null as is_enriched,
    answers.sentiment,
    answers.topics,
    answers.summary,
    results.status,
    results.error_type,
    results.cost_usd,
    results.is_stale,
    results.collected_at
from reviews
left join {{ ref('stg_products') }} as products
    on products.product = reviews.product
left join results
    on results.review_id = reviews.review_id
left join answers
    on answers.review_id = reviews.review_id
