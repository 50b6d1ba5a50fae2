"""The one registry of trust-region controllers: names to classes."""

import keras

from keras_soaa.controllers.base import Controller

_CONTROLLERS: dict[str, type[Controller]] = {}


def register(name: str):
    """Class decorator: makes `SOAA(controller=name)` build this controller.

    It also registers the class for Keras serialization: a model saved with
    it loads wherever its module is imported. Example:
    ```python
    @keras_soaa.controllers.register("sign")
    class SignController(keras_soaa.controllers.Controller):
        ...
    ```

    Raises:
        ValueError: if `name` is taken by another class.
    """

    def decorate(cls: type[Controller]) -> type[Controller]:
        if _CONTROLLERS.get(name, cls) is not cls:
            raise ValueError(
                f"A controller is already registered as {name!r}: "
                f"{_CONTROLLERS[name].__qualname__}."
            )
        cls.name = name
        _CONTROLLERS[name] = cls
        return keras.saving.register_keras_serializable(
            package="keras_soaa.controllers", name=name)(cls)

    return decorate


def names() -> tuple[str, ...]:
    """The registered controllers' names."""
    return tuple(_CONTROLLERS)


def get(identifier) -> Controller:
    """Returns the controller for a registered name, a config or an instance.

    Args:
        identifier: a `Controller`, a registered name, or what `serialize`
            returned for one.

    Raises:
        ValueError: for anything else, naming the registered controllers.
    """
    if isinstance(identifier, Controller):
        return identifier
    if isinstance(identifier, str) and identifier in _CONTROLLERS:
        return _CONTROLLERS[identifier]()
    if isinstance(identifier, dict):
        controller = keras.saving.deserialize_keras_object(identifier)
        if isinstance(controller, Controller):
            return controller
    registered = ", ".join(map(repr, _CONTROLLERS))
    raise ValueError(
        f"Argument `controller` must be one of {registered} or a "
        f"`keras_soaa.controllers.Controller`. Received: controller={identifier!r}"
    )


def serialize(controller: Controller):
    """The controller's name if that recreates it, else its Keras config."""
    cls = type(controller)
    if _CONTROLLERS.get(controller.name) is cls and controller == cls():
        return controller.name
    return keras.saving.serialize_keras_object(controller)
