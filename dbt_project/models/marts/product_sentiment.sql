-- Sentiment per product: how many reviews, how many are enriched, the sentiment mix (shares are of
-- enriched reviews), the average star rating and the three topics reviewers mention most.
with insights as (
    select * from {{ ref('review_insights') }}
),

topic_counts as (
    select product, topic, count(*) as mentions
    from (
        select product, lower(trim(unnest(topics))) as topic
        from insights
        where is_enriched
    )
    where topic <> ''
    group by product, topic
),

top_topics as (
    select
        product,
        list(topic order by mentions desc, topic)[1:3] as top_topics
    from topic_counts
    group by product
),

per_product as (
    select
        product,
        any_value(category) as category,
        count(*) as reviews,
        count(*) filter (where is_enriched) as enriched,
        count(*) filter (where sentiment = 'positive') as positive,
        count(*) filter (where sentiment = 'neutral') as neutral,
        count(*) filter (where sentiment = 'negative') as negative,
        round(avg(rating), 2) as avg_rating,
        sum(coalesce(cost_usd, 0)) as cost_usd
    from insights
    group by product
)

select
    p.product,
    p.category,
    p.reviews,
    p.enriched,
    p.positive,
    p.neutral,
    p.negative,
    round(p.positive / nullif(p.enriched, 0), 3) as positive_share,
    round(p.neutral / nullif(p.enriched, 0), 3) as neutral_share,
    round(p.negative / nullif(p.enriched, 0), 3) as negative_share,
    p.avg_rating,
    coalesce(t.top_topics, []) as top_topics,
    p.cost_usd
from per_product as p
left join top_topics as t
    on t.product = p.product
