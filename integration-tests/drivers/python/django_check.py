"""Django ORM check of pgrouter's real-driver matrix.

A self-contained project: settings are configured here, the app is django_app/ (models and
a committed initial migration). Covers: migrate, CRUD with a ForeignKey, filter/annotate/
aggregate, JSONField, transaction.atomic with a nested savepoint that rolls back, IntegrityError
recovery, select_for_update, bulk_create, update(), delete(), and 12 concurrent threads (each
with its own connection, on an alias using server-side parameter binding) that increment
shared counters under select_for_update. Prints one deterministic line per check.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
WORKERS = 12


def configure():
    import django
    from django.conf import settings

    db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["PGDATABASE"],
        "USER": os.environ["PGUSER"],
        "PASSWORD": os.environ["PGPASSWORD"],
        "HOST": os.environ["PGHOST"],
        "PORT": os.environ["PGPORT"],
    }
    # "bound": server-side parameter binding, and startup parameters that must follow the client
    bound = {**db, "OPTIONS": {"server_side_binding": True, "application_name": "django-bound",
                               "options": "-c lock_timeout=15s"}}
    settings.configure(
        DATABASES={"default": db, "bound": bound},
        INSTALLED_APPS=["django_app"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def out(msg):
    print(f"django: {msg}", flush=True)


def crud():
    from django.db.models import Avg, Count, F, Max, Q, Sum
    from django_app.models import Article, Publisher

    base = datetime(2024, 3, 1, tzinfo=timezone.utc)
    pubs = [Publisher.objects.create(name=f"Press {c}", country=c) for c in ["de", "fr", "jp", "us"]]
    for i, p in enumerate(pubs):
        for k in range(3 + i):
            Article.objects.create(publisher=p, title=f"{p.country}-{k}", words=100 * (k + 1) + i,
                                   rating=Decimal(k % 5) + Decimal("0.25") * i,
                                   published=base + timedelta(days=k, hours=i), tags=[p.country, f"k{k}"])
    out(f"created publishers={Publisher.objects.count()} articles={Article.objects.count()}")
    rows = (Publisher.objects.annotate(n=Count("articles"), words=Sum("articles__words"), best=Max("articles__rating"))
            .order_by("name").values_list("name", "n", "words", "best"))
    for name, n, words, best in rows:
        out(f"annotate {name} articles={n} words={words} best={best}")
    agg = Article.objects.filter(Q(words__gte=200) | Q(publisher__country="jp")).aggregate(
        n=Count("id"), avg=Avg("words"), total=Sum("rating"))
    out(f"aggregate n={agg['n']} avg_words={round(agg['avg'], 3)} rating_sum={agg['total']}")
    jp = Article.objects.filter(tags__contains=["jp"]).exclude(title__endswith="-0").order_by("-published")
    out(f"json filter jp={[a.title for a in jp]} latest={jp[0].published.isoformat()}")
    n = Article.objects.filter(publisher__country="fr").update(words=F("words") + 1000)
    first = Article.objects.select_related("publisher").get(publisher__country="fr", title="fr-0")
    deleted, per_model = Publisher.objects.filter(country="de").delete()
    out(f"update rows={n} fr-0 words={first.words} via={first.publisher.name} "
        f"delete total={deleted} models={sorted(per_model.items())}")


def transactions():
    from django.db import IntegrityError, transaction
    from django_app.models import Article, Counter, Publisher

    us = Publisher.objects.get(country="us")
    with transaction.atomic():
        Counter.objects.create(name="outer", value=1)
        try:
            with transaction.atomic():  # savepoint
                Counter.objects.create(name="inner", value=2)
                Article.objects.create(publisher=us, title="us-0", words=1, rating=0,
                                       published=datetime(2024, 1, 1, tzinfo=timezone.utc))
        except IntegrityError as e:
            inner = e.__cause__.sqlstate
        with transaction.atomic():
            Counter.objects.create(name="inner2", value=3)
            transaction.set_rollback(True)
    names = list(Counter.objects.order_by("name").values_list("name", flat=True))
    assert names == ["outer"], names
    try:
        with transaction.atomic():
            Counter.objects.create(name="gone", value=9)
            raise RuntimeError("abort")
    except RuntimeError:
        pass
    try:
        Publisher.objects.create(name="Press us", country="us")
    except IntegrityError as e:
        dup = e.__cause__.sqlstate
    with transaction.atomic():
        c = Counter.objects.select_for_update().get(name="outer")
        c.value += 10
        c.save(update_fields=["value"])
    out(f"atomic counters={names} inner_error={inner} dup_error={dup} "
        f"outer={Counter.objects.get(name='outer').value} gone={Counter.objects.filter(name='gone').exists()}")


def bulk():
    from django.db.models import Sum
    from django_app.models import Counter, Entry

    Entry.objects.bulk_create([Entry(worker=-1, seq=i, payload={"i": i, "sq": i * i}) for i in range(500)],
                              batch_size=120)
    total = Entry.objects.filter(worker=-1).aggregate(s=Sum("seq"))["s"]
    big = Entry.objects.filter(worker=-1, payload__sq__gte=240000).count()
    Entry.objects.filter(worker=-1, seq__gte=250).delete()
    left = Entry.objects.filter(worker=-1).count()
    Counter.objects.bulk_create([Counter(name=f"shared-{k}") for k in range(3)])
    out(f"bulk_create entries=500 seq_sum={total} sq>=240000={big} after_delete={left}")


def worker(w):
    from django.db import IntegrityError, connections, transaction
    from django_app.models import Counter, Entry

    try:
        for tx in range(5):
            with transaction.atomic(using="bound"):
                c = Counter.objects.using("bound").select_for_update().get(name=f"shared-{(w + tx) % 3}")
                c.value = c.value + w + 1
                c.save(update_fields=["value"])
                Entry.objects.using("bound").bulk_create(
                    [Entry(worker=w, seq=tx * 10 + k, payload={"w": w, "tx": tx}) for k in range(10)])
            try:
                with transaction.atomic(using="bound"):
                    Entry.objects.using("bound").create(worker=w, seq=tx * 10, payload={})
                raise AssertionError("duplicate entry accepted")
            except IntegrityError:
                pass
        mine = list(Entry.objects.using("bound").filter(worker=w).order_by("seq").values_list("seq", flat=True))
        assert mine == list(range(50)), (w, mine)
        with connections["bound"].cursor() as cur:
            cur.execute("select current_setting('TimeZone'), current_setting('application_name'),"
                        " current_setting('lock_timeout')")
            tz, app, lock = cur.fetchone()
        return f"worker {w:02d} entries={len(mine)} tz={tz} app={app} lock_timeout={lock}"
    finally:
        connections.close_all()


def main():
    configure()
    from django.core.management import call_command
    from django_app.models import Counter, Entry

    call_command("migrate", verbosity=0)
    from django.db import connection
    with connection.cursor() as cur:
        cur.execute("select app, name from django_migrations order by app, name")
        out(f"migrated {cur.fetchall()}")
    crud()
    transactions()
    bulk()
    connection.close()
    with ThreadPoolExecutor(WORKERS) as ex:
        for line in sorted(ex.map(worker, range(WORKERS))):
            out(line)
    shared = list(Counter.objects.filter(name__startswith="shared-").order_by("name").values_list("name", "value"))
    expected = [0, 0, 0]
    for w in range(WORKERS):
        for tx in range(5):
            expected[(w + tx) % 3] += w + 1
    assert [v for _, v in shared] == expected, (shared, expected)
    out(f"select_for_update counters={shared} entries={Entry.objects.filter(worker__gte=0).count()}")
    out("ok")


if __name__ == "__main__":
    main()
