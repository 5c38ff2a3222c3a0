"""The Celery glue, and the only part of rmq that imports celery, kombu or billiard: ``install()``,
the task base class and decorator, the request class, the governor's bootstep and actuator,
remote-control commands, beat tasks, the autoscaler and signals. Each piece delegates to the
policy objects of the resource packages."""
