"""The web page in headless Chromium (Debian's chromium and chromium-driver): the form is built from the
pipeline's declared parameters, a submitted job shows progress and lands in the gallery."""

from __future__ import annotations

import shutil

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_helpers import serve_fixture, tiny  # noqa: F401


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def fill(driver: webdriver.Chrome, name: str, value: str) -> None:
    element = driver.find_element(By.NAME, name)
    element.clear()
    element.send_keys(value)


def test_page_form_progress_and_gallery(serve, tmp_path):
    base = serve(tiny("qwen-image"))
    declared = httpx.get(base + "v1/pipeline").json()["parameters"]
    driver = browser()
    try:
        driver.get(base)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.NAME, "prompt"))
        # one field per declared parameter a request can set, of the kind its declaration says
        fields = {
            e.get_attribute("data-param") for e in driver.find_elements(By.CSS_SELECTOR, ".field[data-param]")
        }
        assert {p["name"] for p in declared} <= fields
        assert driver.find_element(By.NAME, "prompt").tag_name == "textarea"
        assert driver.find_element(By.NAME, "tiled").get_attribute("type") == "checkbox"
        assert driver.find_element(By.NAME, "input_image").get_attribute("type") == "file"
        assert driver.find_element(By.NAME, "seed").get_attribute("type") == "number"
        assert driver.find_element(By.NAME, "cache").get_attribute("type") == "text"  # a per-call option
        fill(driver, "prompt", "a red fox in the snow")
        driver.execute_script("document.getElementById('more').open = true")  # the other parameters
        fill(driver, "cache", "fbcache")
        fill(driver, "seed", "5")
        fill(driver, "width", "32")
        fill(driver, "height", "32")
        fill(driver, "num_inference_steps", "3")
        driver.find_element(By.ID, "generate").click()
        img = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img[data-loaded]"))[0]
        assert driver.execute_script("return arguments[0].naturalWidth", img) == 32
        assert driver.find_element(By.ID, "progress").get_attribute("value") == "3"
        assert "seed 5" in driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert (
            driver.find_element(By.CSS_SELECTOR, "#gallery a.download")
            .get_attribute("download")
            .endswith(".png")
        )
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
        # a field error is shown on its field
        fill(driver, "cfg_scale", "-1")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.field.invalid[data-param="cfg_scale"]'))
        assert "cfg_scale" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
