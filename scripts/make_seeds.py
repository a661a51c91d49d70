"""Generate the example project's seed data: 2,400 synthetic product reviews and a product list.

The data is meant to exercise the bridge, so besides ordinary reviews it plants the awkward cases a
real table has, in fixed numbers and on disjoint rows (so tests can count them exactly):

* review_ids that are not valid Batches API custom_ids (spaces, slashes, dots, `#`, unicode, > 64 chars)
* rows whose product, rating, title and body repeat another row's (identical prompts, sent once)
* empty and whitespace-only bodies (the bridge records "empty prompt")
* very long bodies (8,000-20,000 characters)
* one review_id shared by two rows with different text, and one row with no review_id at all
* non-ASCII text (accents, CJK, emoji), embedded quotes, commas and newlines (CSV-quoted)

Everything comes from one seeded `random.Random`, so the output is byte-identical on every run.
Usage: python scripts/make_seeds.py [--out-dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

N_REVIEWS = 2400
N_INVALID_IDS = 40
N_DUPLICATE_TEXT = 60  # rows that copy another row's product/rating/title/body
N_EMPTY_BODIES = 20
N_BLANK_BODIES = 4  # whitespace-only
N_LONG_BODIES = 10
DEFAULT_SEED = 20250601
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dbt_project" / "seeds"

# product, category, price_usd, the aspects its reviews talk about
PRODUCTS: list[tuple[str, str, float, tuple[str, ...]]] = [
    ("Auralis Q30 Wireless Headphones", "headphones", 129.00, ("battery", "sound", "comfort", "noise", "price", "connectivity")),
    ("Auralis Buds Pro", "headphones", 89.99, ("battery", "sound", "comfort", "connectivity", "price", "durability")),
    ("Sonora ANC 700", "headphones", 249.00, ("noise", "sound", "comfort", "battery", "price", "service")),
    ("Kestrel Sport Earbuds", "headphones", 49.95, ("comfort", "battery", "durability", "sound", "shipping")),
    ("Sonora Desk Speaker", "headphones", 159.00, ("sound", "connectivity", "price", "design", "shipping")),
    ("Brewcraft Burr Grinder", "coffee grinders", 119.00, ("grind", "noise", "durability", "cleaning", "price")),
    ("Brewcraft Precision Pro", "coffee grinders", 229.00, ("grind", "noise", "design", "service", "price")),
    ("Mokka Hand Grinder", "coffee grinders", 64.50, ("grind", "durability", "design", "price", "shipping")),
    ("Grindwell Café Mini", "coffee grinders", 39.99, ("grind", "noise", "cleaning", "durability", "price")),
    ("Stridelite Trail 4", "running shoes", 139.00, ("comfort", "fit", "durability", "grip", "price")),
    ("Stridelite Road Racer", "running shoes", 159.00, ("comfort", "fit", "weight", "durability", "shipping")),
    ("Pacefox Cloudrun", "running shoes", 119.00, ("comfort", "fit", "durability", "design", "service")),
    ("Pacefox Tempo 2", "running shoes", 99.00, ("fit", "weight", "grip", "price", "durability")),
    ("Chefline Air Fryer 5L", "kitchen", 89.00, ("cooking", "noise", "cleaning", "design", "price")),
    ("Brewcraft Kettle Go", "kitchen", 45.00, ("design", "durability", "noise", "price", "shipping")),
    ('ThermaCup 16oz "Forever" Travel Mug', "kitchen", 24.99, ("insulation", "durability", "cleaning", "design", "price")),
    ("Lumo Smart Bulb (4-pack)", "smart home", 39.99, ("setup", "connectivity", "brightness", "price", "service")),
    ("Lumo Motion Sensor", "smart home", 29.99, ("setup", "battery", "connectivity", "service", "price")),
    ("Nestwell Thermostat", "smart home", 179.00, ("setup", "design", "connectivity", "service", "price")),
    ("Trekkit 28L Daypack", "outdoor", 79.00, ("comfort", "durability", "design", "price", "shipping")),
    ("Trekkit Rain Shell", "outdoor", 149.00, ("waterproofing", "fit", "durability", "weight", "price")),
    ("Summit Headlamp 400", "outdoor", 34.95, ("battery", "brightness", "comfort", "durability", "price")),
    ("Pulse Fitness Band", "fitness", 59.00, ("battery", "setup", "comfort", "connectivity", "service")),
    ("FlexCore Yoga Mat", "fitness", 42.00, ("grip", "comfort", "durability", "cleaning", "shipping")),
    ("IronGrip Adjustable Dumbbells", "fitness", 299.00, ("durability", "design", "price", "shipping", "service")),
]

# aspect -> (positive, neutral, negative) sentences
ASPECTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "battery": (
        ["Battery life is excellent, I charge it maybe once a week.", "The battery easily lasts a full day of heavy use.", "Charges fast over USB-C and holds it for days."],
        ["Battery life is about what the box promises, no more.", "Battery is fine for a day; I top it up every night."],
        ["The battery barely lasts four hours, nowhere near the advertised 30.", "Battery died completely after two months.", "It drains its battery even when switched off."],
    ),
    "sound": (
        ["Sound is rich and balanced, the bass is punchy without being muddy.", "Crystal-clear highs, I keep hearing details in songs I know by heart."],
        ["Sound is decent for the price, a bit bass-heavy.", "Audio quality is okay; nothing special."],
        ["Sound is tinny and distorts at anything above half volume.", "There's a constant hiss in the left channel."],
    ),
    "comfort": (
        ["Super comfortable, I forget I'm wearing them.", "Comfortable for hours, even on a long-haul flight.", "Cushioning is soft and supportive from the first run."],
        ["Comfort is okay, a little tight after an hour or two.", "Comfortable enough, but it took a week to break in."],
        ["Uncomfortable after twenty minutes; it pinches.", "It rubbed a blister on my heel on the very first run."],
    ),
    "noise": (
        ["Remarkably quiet, I can use it at 6am without waking anyone.", "Noise cancelling is superb; the office just disappears."],
        ["It's about as loud as any other model I've owned.", "Noise level is acceptable, not whisper-quiet."],
        ["It is LOUD. Like a jet engine in my kitchen.", "Noise cancelling barely does anything on the train."],
    ),
    "price": (
        ["Great value for money, half the price of the big brands.", "Worth every penny at this price."],
        ["Price is fair, though it's often on sale for less.", "A bit pricey, but you get what you pay for."],
        ["Way overpriced for what it is.", "Not worth the money; cheaper models do the same job."],
    ),
    "connectivity": (
        ["Pairs instantly with my phone and laptop and switches between them seamlessly.", "The Bluetooth connection is rock solid across the house."],
        ["Pairing works, but the app is clunky.", "Connection drops once in a while, nothing major."],
        ["Keeps disconnecting from Wi-Fi every few hours.", "Bluetooth pairing fails half the time; I have to reset it constantly."],
    ),
    "durability": (
        ["Feels built to last; I've dropped it plenty and it still looks new.", "After a year of daily use it's still going strong."],
        ["Build quality seems okay so far, time will tell.", "Some scuffs after a few months, but it works."],
        ["It broke after three weeks.", "The hinge cracked within a month of normal use.", "The sole started peeling off after 100 km."],
    ),
    "design": (
        ["Beautiful design, it looks great on my counter.", "Sleek, minimal and well thought out."],
        ["The design is plain but functional.", "Looks fine; the colour is a bit different from the photos."],
        ["The buttons are in the worst possible place.", "Cheap-looking plastic, it feels like a toy."],
    ),
    "shipping": (
        ["Arrived two days early and very well packed.", "Fast shipping, and the packaging was fully recyclable."],
        ["Shipping took about a week, as expected.", "Delivery was fine, the box was a little dented."],
        ["Shipping took three weeks and the box arrived crushed.", "It arrived with a missing part, and tracking never updated."],
    ),
    "service": (
        ["Customer service replaced it within days, no questions asked.", "Support answered my email within an hour and solved the problem."],
        ["Customer service was polite but slow.", "I had to contact support once; it took a few emails."],
        ["Customer service never answered my emails.", "Support kept sending me the same canned reply, \"please restart the device\"."],
    ),
    "grind": (
        ["Grind consistency is fantastic, from espresso to French press.", "Very even grind, my pour-overs have never tasted better."],
        ["Grind is consistent at medium settings, less so for espresso.", "It grinds fine for drip coffee."],
        ["The grind is wildly inconsistent: boulders and dust.", "It can't go fine enough for espresso, despite the \"espresso\" setting."],
    ),
    "cleaning": (
        ["Easy to clean, everything comes apart without tools.", "Dishwasher-safe parts, a real time saver."],
        ["Cleaning takes a few minutes; the brush helps.", "Cleaning is a bit fiddly but manageable."],
        ["Impossible to clean properly, grounds get stuck everywhere.", "The coating started flaking after a few washes."],
    ),
    "fit": (
        ["True to size and the fit is perfect.", "Fits like a glove, with plenty of room in the toe box."],
        ["Runs a little large; I'd go half a size down.", "Fit is okay but narrow for wide feet."],
        ["Runs two sizes small, I had to return it.", "The fit is awful, my heel slips out with every step."],
    ),
    "grip": (
        ["Grip is excellent, even on wet rocks.", "Fantastic traction, nothing slips."],
        ["Grip is fine on dry surfaces.", "Traction is average."],
        ["Zero grip on wet pavement, I nearly fell twice.", "It slides around on the floor during every session."],
    ),
    "weight": (
        ["Incredibly light, you barely notice it.", "Lightweight without feeling flimsy."],
        ["Weight is average for this category.", "A bit heavier than I expected, but fine."],
        ["Heavy and clunky compared to the previous version.", "Much heavier than advertised."],
    ),
    "cooking": (
        ["Fries come out crispy in 12 minutes, and chicken wings are perfect.", "Cooks evenly and fast, I barely use my oven now."],
        ["Cooks well, but the basket is smaller than it looks.", "Results are fine, though you need to shake the basket often."],
        ["Food comes out soggy on one side and burnt on the other.", "The timer is inaccurate and things burn."],
    ),
    "insulation": (
        ["Keeps coffee hot for 8 hours, no exaggeration.", "Ice still there the next morning!"],
        ["Keeps drinks warm for a few hours.", "Insulation is okay, similar to other mugs."],
        ["Coffee is lukewarm after an hour.", "The lid leaks, so insulation doesn't matter much."],
    ),
    "setup": (
        ["Setup took two minutes with the app.", "Installation was painless, even for a non-techie like me."],
        ["Setup was okay once I found the right app version.", "Setup took a while but the instructions were clear."],
        ["Setup was a nightmare, the app kept crashing.", "Couldn't get it to join my network after an hour of trying."],
    ),
    "brightness": (
        ["Very bright and the colour temperature is adjustable.", "Lights up the whole trail, impressive."],
        ["Brightness is adequate for indoor use.", "Bright enough, but the beam is narrow."],
        ["Much dimmer than advertised.", "Flickers at low brightness settings."],
    ),
    "waterproofing": (
        ["Stayed bone dry through a three-hour downpour.", "Truly waterproof, water just beads off."],
        ["Fine for light rain, damp after heavy showers.", "Water resistance is okay."],
        ["Soaked through within twenty minutes of rain.", "The seams leak; not waterproof at all."],
    ),
}

OPENERS = (
    ["Love it!", "Really happy with this purchase.", "Bought this for my partner and we both use it now.", "Second one I've bought.", "Exceeded my expectations."],
    ["Mixed feelings.", "It's okay.", "Used it for about a month now.", "Decent, with a few caveats.", "Replaced my old one with this."],
    ["Very disappointed.", "Do not buy.", "Returned it.", "I really wanted to like this.", "Waste of money."],
)
CLOSERS = (
    ["Highly recommend.", "Would buy again, 10/10.", "Five stars from me.", "Already recommended it to friends."],
    ["Would maybe buy again on sale.", "Fine if your expectations are realistic.", "Three stars, it does the job."],
    ["Avoid.", "I'm returning it.", "Save your money.", "One star, and that's generous."],
)
TITLES = (
    ["Excellent", "Best purchase this year", "Great value", "Exactly what I needed", "Love it", "Fantastic quality", "Works perfectly", "Highly recommended"],
    ["Okay for the price", "Decent", "Good, not great", "Does the job", "Mixed feelings", "Average", "Fine, with caveats"],
    ["Disappointed", "Broke quickly", "Not as advertised", "Terrible", "Returned it", "Avoid this one", "Poor quality"],
)
# Non-ASCII reviews: (sentiment, title, body)
FOREIGN = [
    (0, "Très bien !", "Produit génial, la qualité est au rendez-vous. Livraison rapide, je recommande à 100 % 👍"),
    (0, "Sehr gut", "Tolle Qualität, funktioniert einwandfrei. Größe passt perfekt, Preis-Leistung stimmt."),
    (0, "Excelente", "Me encantó, muy cómodo y la batería dura muchísimo. ¡Lo volvería a comprar!"),
    (0, "最高です", "とても使いやすいです。音質も良く、バッテリーも長持ちします。買ってよかった！😊"),
    (0, "非常满意", "质量很好，物流很快，包装也很仔细。性价比很高，推荐购买。"),
    (0, "Ótimo", "Produto excelente, chegou antes do prazo. Recomendo demais ❤️"),
    (1, "Correct, sans plus", "Ça fait le travail, mais le bruit est un peu fort le matin… Prix correct."),
    (1, "まあまあ", "悪くはないですが、少し重いです。値段相応だと思います。"),
    (1, "Geht so", "Funktioniert, aber die App ist umständlich. Für den Preis okay."),
    (2, "Décevant 😞", "Cassé après deux semaines. Le service client ne répond pas. Je déconseille."),
    (2, "不推荐", "用了一周就坏了，客服也不回复。非常失望 😡"),
    (2, "Malísimo", "Llegó roto y el servicio al cliente nunca respondió. No lo compren."),
    (2, "Enttäuschend", "Die Größe fällt viel zu klein aus, Rücksendung war mühsam. Schade!"),
]
EMOJI = ["👍", "🔥", "😊", "🎧", "☕", "🏃‍♀️", "💯", "😤", "👎", "✨"]
INVALID_IDS = [
    "R 000101", "R/2025/0102", "R.000103", "#R000104", "rév-ü-105", "R000106 copy", "review #107", "R000108.v2",
    "2025/03/R109", "R_110 (dup?)", "Rück-111", "R:000112", "R000113@import", "r\u00e9view-114", "R+115", "R000116/a",
    "評価-117", "R000118!", "R 000 119", "R~120", "R000121*", "R000122?", "R000123,b", "R'124", 'R"125"', "R000126;",
    "R&127", "R000128%", "R=129", "R000130$", "R000131\u00a0nbsp", "R000132.", "über-133", "R|134", "R000135[1]",
    "R{136}", "R<137>", "R000138 🎧", "R\\139",
    "R000140-" + "x" * 60,  # 67 characters: well-formed characters, too long
]
SENTIMENT_OF_RATING = {5: 0, 4: 0, 3: 1, 2: 2, 1: 2}


@dataclass
class Review:
    review_id: str
    product: str
    rating: int
    title: str
    body: str
    created_at: str


def _body(rng: random.Random, aspects: tuple[str, ...], sentiment: int, rating: int) -> str:
    parts = [rng.choice(OPENERS[sentiment])]
    for aspect in rng.sample(aspects, k=rng.randint(2, min(4, len(aspects)))):
        # mostly consistent with the rating, sometimes a contrasting point ("but the price...")
        tone = sentiment if rng.random() < 0.75 else rng.choice([0, 1, 2])
        parts.append(rng.choice(ASPECTS[aspect][tone]))
    if rng.random() < 0.5:
        parts.append(rng.choice(CLOSERS[sentiment]))
    if rng.random() < 0.15:
        parts.append(f"Bought it in {rng.choice(['January', 'March', 'June', 'October'])}, used it {rng.randint(2, 40)} times, rated {rating}/5.")
    if rng.random() < 0.08:
        parts.append(rng.choice(EMOJI))
    text = " ".join(parts)
    if rng.random() < 0.2:  # paragraphs: embedded newlines survive CSV quoting
        cut = text.find(". ", len(text) // 2)
        if cut > 0:
            text = text[: cut + 1] + "\n\n" + text[cut + 2 :]
    if rng.random() < 0.05:
        text += '\nEdit: the seller says it\'s a "known issue, fixed in v2", we\'ll see.'
    return text


def _long_body(rng: random.Random, aspects: tuple[str, ...], sentiment: int, target: int) -> str:
    paragraphs = [f"Long review after {rng.randint(3, 18)} months of use, sorry in advance."]
    size = len(paragraphs[0])
    day = 1
    while size < target:
        sentences = [rng.choice(ASPECTS[a][rng.choice([sentiment, sentiment, 1])]) for a in rng.choices(aspects, k=6)]
        p = f"Week {day}: " + " ".join(sentences)
        paragraphs.append(p)
        size += len(p) + 2
        day += 1
    return "\n\n".join(paragraphs)


def _rating(rng: random.Random) -> int:
    return rng.choices([5, 4, 3, 2, 1], weights=[40, 25, 12, 9, 14])[0]


def generate(seed: int = DEFAULT_SEED) -> tuple[list[Review], list[tuple[str, str, float]]]:
    """All reviews and products; the same seed gives the same rows."""
    rng = random.Random(seed)
    start = datetime(2025, 1, 1)
    span = int((datetime(2026, 6, 30) - start).total_seconds())
    stamps = sorted(rng.randrange(span) for _ in range(N_REVIEWS))
    reviews: list[Review] = []
    seen: set[tuple[str, int, str, str]] = set()  # only the planted copies below may repeat a text
    for i, offset in enumerate(stamps, start=1):
        product, _, _, aspects = rng.choice(PRODUCTS)
        rating = _rating(rng)
        sentiment = SENTIMENT_OF_RATING[rating]
        while True:
            if rng.random() < 0.06:
                s, title, body = rng.choice([f for f in FOREIGN if f[0] == sentiment])
                if rng.random() < 0.7:
                    body = body + " " + rng.choice(ASPECTS[rng.choice(aspects)][s])
            else:
                title = rng.choice(TITLES[sentiment])
                if rng.random() < 0.1:
                    title += " " + rng.choice(EMOJI)
                elif rng.random() < 0.05:
                    title = f'"{title}", honestly'
                body = _body(rng, aspects, sentiment, rating)
            if (product, rating, title, body) not in seen:
                seen.add((product, rating, title, body))
                break
        created = (start + timedelta(seconds=offset)).strftime("%Y-%m-%d %H:%M:%S")
        reviews.append(Review(f"R{i:06d}", product, rating, title, body, created))

    # The awkward cases, each on its own rows (row 0 stays ordinary so the file starts plainly).
    picks = rng.sample(range(1, N_REVIEWS), N_INVALID_IDS + N_DUPLICATE_TEXT + N_EMPTY_BODIES + N_BLANK_BODIES + N_LONG_BODIES + 3)
    taken = iter(picks)
    for bad_id in INVALID_IDS:
        reviews[next(taken)].review_id = bad_id
    copies = [next(taken) for _ in range(N_DUPLICATE_TEXT)]
    for _ in range(N_EMPTY_BODIES):
        reviews[next(taken)].body = ""
    for ws in ["   ", "\n", "\t \n ", " "][:N_BLANK_BODIES]:
        reviews[next(taken)].body = ws
    for _ in range(N_LONG_BODIES):
        r = reviews[next(taken)]
        aspects = next(p[3] for p in PRODUCTS if p[0] == r.product)
        r.body = _long_body(rng, aspects, SENTIMENT_OF_RATING[r.rating], rng.randint(8000, 19000))
    dup_a, dup_b, no_id = next(taken), next(taken), next(taken)
    reviews[dup_b].review_id = reviews[dup_a].review_id  # same id, different text
    reviews[dup_b].body = "Second review under the same id: " + reviews[dup_b].body
    reviews[no_id].review_id = ""  # loads as NULL
    # Text copies last, from ordinary rows only, so every copy is an identical prompt of a sendable row.
    special = set(picks)
    originals = rng.sample([i for i in range(N_REVIEWS) if i not in special], 40)
    for n, i in enumerate(copies):
        src = reviews[originals[n % len(originals)]]
        dst = reviews[i]
        dst.product, dst.rating, dst.title, dst.body = src.product, src.rating, src.title, src.body
    return reviews, [(p, c, price) for p, c, price, _ in PRODUCTS]


def to_csv(rows: list[list[object]], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Write reviews.csv and products.csv into out_dir; return the statistics of what was written."""
    reviews, products = generate(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reviews.csv").write_text(
        to_csv([[r.review_id, r.product, r.rating, r.title, r.body, r.created_at] for r in reviews],
               ["review_id", "product", "rating", "title", "body", "created_at"]),
        encoding="utf-8",
    )
    (out_dir / "products.csv").write_text(
        to_csv([[p, c, f"{price:.2f}"] for p, c, price in products], ["product", "category", "price_usd"]),
        encoding="utf-8",
    )
    return stats(reviews)


def stats(reviews: list[Review]) -> dict[str, int]:
    """Counts of each awkward case, and of rows the bridge can send (non-null unique key, non-blank body)."""
    ids = [r.review_id for r in reviews]
    id_count: dict[str, int] = {}
    for i in ids:
        id_count[i] = id_count.get(i, 0) + 1
    text_count: dict[tuple, int] = {}
    for r in reviews:
        if r.body.strip():
            k = (r.product, r.rating, r.title, r.body)
            text_count[k] = text_count.get(k, 0) + 1
    sendable = [r for r in reviews if r.review_id and id_count[r.review_id] == 1 and r.body.strip()]
    return {
        "rows": len(reviews),
        "invalid_custom_ids": sum(1 for i in ids if i and not CUSTOM_ID.match(i)),
        "null_ids": sum(1 for i in ids if not i),
        "duplicate_id_rows": sum(1 for i in ids if i and id_count[i] > 1),
        "rows_with_repeated_text": sum(1 for r in reviews if r.body.strip() and text_count[(r.product, r.rating, r.title, r.body)] > 1),
        "empty_bodies": sum(1 for r in reviews if r.body == ""),
        "blank_bodies": sum(1 for r in reviews if r.body and not r.body.strip()),
        "long_bodies": sum(1 for r in reviews if len(r.body) >= 8000),
        "non_ascii_rows": sum(1 for r in reviews if not (r.title + r.body).isascii()),
        "multiline_bodies": sum(1 for r in reviews if "\n" in r.body.strip()),
        "sendable": len(sendable),
        "distinct_sendable_prompts": len({(r.product, r.rating, r.title, r.body) for r in sendable}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args()
    s = write(args.out_dir, args.seed)
    print(f"wrote {args.out_dir}/reviews.csv and products.csv: " + ", ".join(f"{k}={v}" for k, v in s.items()))


if __name__ == "__main__":
    main()
