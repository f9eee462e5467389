from django.db import models


class Publisher(models.Model):
    name = models.CharField(max_length=100, unique=True)
    country = models.CharField(max_length=2)


class Article(models.Model):
    publisher = models.ForeignKey(Publisher, on_delete=models.CASCADE, related_name="articles")
    title = models.CharField(max_length=200)
    words = models.IntegerField()
    rating = models.DecimalField(max_digits=4, decimal_places=2)
    published = models.DateTimeField()
    tags = models.JSONField(default=list)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["publisher", "title"], name="uniq_publisher_title")]


class Counter(models.Model):
    name = models.CharField(max_length=50, unique=True)
    value = models.IntegerField(default=0)


class Entry(models.Model):
    worker = models.IntegerField()
    seq = models.IntegerField()
    payload = models.JSONField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["worker", "seq"], name="uniq_worker_seq")]
